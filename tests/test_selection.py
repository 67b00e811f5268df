"""Selection over random candidate sets: deterministic, order-independent, never an impl with
reasons, highest priority (ties by name); forced choices never fall back; errors list reasons."""
from __future__ import annotations

import os
import string
from typing import Callable
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luce_core.caps import Caps
from luce_core.config import RunConfig
from luce_core.contract.errors import SelectionError
from luce_core.contract import CONTRACT_VERSION
from luce_core.contract.impl import ROLES, Impl
from luce_core.selection import explain, forced_name, select

SETTINGS = settings(max_examples=50, deadline=None)
CAPS = Caps()
# reasons are free text; letters, digits, punctuation and spaces, never empty
reasons_text = st.text(string.ascii_letters + string.digits + " .,:=<>()-_", min_size=1, max_size=30).map(
    lambda s: s.strip() or "x")


def _requires(reasons: tuple[str, ...]) -> Callable[[Caps, RunConfig], list[str]]:
    return lambda caps, config: list(reasons)


@st.composite
def candidate_sets(draw: st.DrawFn, role: str = "linear") -> list[Impl]:
    names = draw(st.lists(st.text("abcdefgh-", min_size=1, max_size=4), min_size=1, max_size=7, unique=True))
    impls = []
    for name in names:
        reasons = tuple(draw(st.lists(reasons_text, max_size=2)))
        impls.append(Impl(role, name, f"pkg.{name}:Factory", contract=CONTRACT_VERSION, priority=draw(st.integers(-2, 2)),
                          requires=_requires(reasons)))
    return impls


def _runnable(impls: list[Impl]) -> list[Impl]:
    return [i for i in impls if not i.reasons(CAPS, RunConfig())]


@SETTINGS
@given(impls=candidate_sets(), data=st.data())
def test_picks_max_priority_then_name_whatever_the_order(impls: list[Impl], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(impls))
    ok = _runnable(impls)
    if not ok:
        with pytest.raises(SelectionError) as e:
            select("linear", shuffled, CAPS, RunConfig())
        for impl in impls:  # one error listing every candidate's reasons
            assert impl.name in str(e.value)
            assert all(r in str(e.value) for r in impl.reasons(CAPS, RunConfig()))
        return
    chosen = select("linear", shuffled, CAPS, RunConfig())
    assert chosen == select("linear", impls, CAPS, RunConfig())  # order-independent, deterministic
    assert chosen in ok  # never one with reasons
    best = max(i.priority for i in ok)
    assert chosen.priority == best
    assert chosen.name == min(i.name for i in ok if i.priority == best)
    cands = explain("linear", shuffled, CAPS, RunConfig())
    assert [c.impl.name for c in cands if c.selected] == [chosen.name]
    assert {c.impl.name: c.reasons for c in cands} == {i.name: tuple(i.reasons(CAPS, RunConfig())) for i in impls}


@SETTINGS
@given(impls=candidate_sets(), data=st.data(), via_env=st.booleans())
def test_forced_choice_is_used_or_fails_with_its_reasons(impls: list[Impl], data: st.DataObject, via_env: bool) -> None:
    forced = data.draw(st.sampled_from([i.name for i in impls] + ["zz-not-installed"]))
    config = RunConfig() if via_env else RunConfig(overrides={"linear": forced})
    with mock.patch.dict(os.environ, {"LUCE_LINEAR": forced} if via_env else {}, clear=False):
        if not via_env:
            os.environ.pop("LUCE_LINEAR", None)
        target = next((i for i in impls if i.name == forced), None)
        if target is None:
            with pytest.raises(SelectionError, match="not installed"):
                select("linear", impls, CAPS, config)
        elif target.reasons(CAPS, config):  # no fallback to another candidate
            with pytest.raises(SelectionError, match="forced") as e:
                select("linear", impls, CAPS, config)
            assert all(r in str(e.value) for r in target.reasons(CAPS, config))
        else:
            assert select("linear", impls, CAPS, config) is target
            others = [c for c in explain("linear", impls, CAPS, config) if c.impl is not target]
            assert all(c.reasons and not c.selected for c in others)


@SETTINGS
@given(impls=candidate_sets(), data=st.data())
def test_excluded_impl_is_never_selected(impls: list[Impl], data: st.DataObject) -> None:
    excluded = data.draw(st.sets(st.sampled_from([i.name for i in impls])))
    rest = [i for i in _runnable(impls) if i.name not in excluded]
    if not rest:
        with pytest.raises(SelectionError, match="failed at first use" if excluded else "can run here"):
            select("linear", impls, CAPS, RunConfig(), exclude=tuple(excluded))
        return
    chosen = select("linear", impls, CAPS, RunConfig(), exclude=tuple(excluded))
    assert chosen.name not in excluded and chosen in rest


@pytest.mark.parametrize("role", ROLES)
def test_env_override_per_role(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    impls = [Impl(role, "high", "m:f", contract=CONTRACT_VERSION, priority=9), Impl(role, "low", "m:f", contract=CONTRACT_VERSION, priority=1)]
    monkeypatch.setenv(f"LUCE_{role.upper()}", "low")
    assert forced_name(role, RunConfig()) == "low"
    assert select(role, impls, CAPS, RunConfig()).name == "low"
    # the explicit option (CLI flag / API keyword) beats the environment
    assert select(role, impls, CAPS, RunConfig(overrides={role: "high"})).name == "high"
    monkeypatch.setenv(f"LUCE_{role.upper()}", "auto")  # "auto" means: let luce choose
    assert forced_name(role, RunConfig()) is None
    assert select(role, impls, CAPS, RunConfig()).name == "high"


def test_env_of_another_role_does_not_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUCE_ATTENTION", "low")
    impls = [Impl("linear", "high", "m:f", contract=CONTRACT_VERSION, priority=9), Impl("linear", "low", "m:f", contract=CONTRACT_VERSION, priority=1)]
    assert select("linear", impls, CAPS, RunConfig()).name == "high"


def test_no_candidates_at_all() -> None:
    with pytest.raises(SelectionError, match="no candidates installed"):
        select("drafter", [], CAPS, RunConfig())


def test_crashing_requires_becomes_a_reason() -> None:
    def broken(caps: Caps, config: RunConfig) -> list[str]:
        raise KeyError("cc")

    impls = [Impl("linear", "crashy", "m:f", contract=CONTRACT_VERSION, priority=5, requires=broken), Impl("linear", "safe", "m:f", contract=CONTRACT_VERSION)]
    assert select("linear", impls, CAPS, RunConfig()).name == "safe"
    crashy = next(c for c in explain("linear", impls, CAPS, RunConfig()) if c.impl.name == "crashy")
    assert crashy.reasons == ("requires() raised KeyError: 'cc'",)


# ----------------------------------------------------------------------------- contract version
@pytest.mark.parametrize("stated, refused", [
    (CONTRACT_VERSION, None),
    (f"{CONTRACT_VERSION.split('.')[0]}.99", None),  # minor versions only add optional members
    ("2.0", "built for luce contract 2.x; this luce implements 1.0: upgrade the plugin or luce"),
    ("0.3", "built for luce contract 0.x"),
    ("", "states no contract version"),
    ("one", "not MAJOR.MINOR"),
])
def test_contract_version_is_checked_before_requires(stated: str, refused: str | None) -> None:
    asked = []
    impl = Impl("linear", "p", "m:f", contract=stated, requires=lambda c, cfg: asked.append(1) or [])
    cands = explain("linear", [impl], CAPS, RunConfig())
    if refused is None:
        assert cands[0].selected and cands[0].reasons == () and asked
        return
    assert not cands[0].selected and not asked  # requires() of another contract is not called
    assert len(cands[0].reasons) == 1 and refused in cands[0].reasons[0]
    with pytest.raises(SelectionError, match="contract"):
        select("linear", [impl], CAPS, RunConfig(overrides={"linear": "p"}))


# ----------------------------------------------------------------------------- KV layout pairing
def _attn(name: str, reads: tuple[str, ...] | None, priority: int = 0) -> Impl:
    return Impl("attention", name, "m:f", priority=priority, contract=CONTRACT_VERSION, reads_kv_layouts=reads)


def _kv(name: str, layout: str) -> Impl:
    return Impl("kv_storage", name, "m:f", contract=CONTRACT_VERSION, kv_layout=layout)


def test_attention_that_cannot_read_the_store_is_refused_with_the_layouts() -> None:
    impls = [_attn("fast", ("dense-v1",), 20), _attn("ref", None)]
    cands = {c.impl.name: c for c in explain("attention", impls, CAPS, RunConfig(), kv_storage=_kv("mine", ""))}
    assert cands["fast"].reasons == ("reads KV layouts dense-v1 only; kv_storage 'mine' provides opaque",)
    assert cands["ref"].selected
    assert select("attention", impls, CAPS, RunConfig(), kv_storage=_kv("other", "paged-v9")).name == "ref"
    with pytest.raises(SelectionError, match="forced but cannot run here: reads KV layouts dense-v1 only"):
        select("attention", impls, CAPS, RunConfig(overrides={"attention": "fast"}), kv_storage=_kv("mine", ""))


def test_attention_pairs_with_a_store_of_a_layout_it_reads() -> None:
    impls = [_attn("fast", ("paged-v9", "dense-v1"), 20), _attn("ref", None)]
    assert select("attention", impls, CAPS, RunConfig(), kv_storage=_kv("dense", "dense-v1")).name == "fast"
    assert select("attention", impls, CAPS, RunConfig()).name == "fast"  # no store chosen: nothing to pair


def test_pairing_reason_adds_to_the_others() -> None:
    impl = Impl("attention", "fast", "m:f", contract=CONTRACT_VERSION, reads_kv_layouts=("dense-v1",),
                requires=lambda c, cfg: ["no NVIDIA GPU"])
    (cand,) = explain("attention", [impl], CAPS, RunConfig(), kv_storage=_kv("mine", ""))
    assert cand.reasons == ("no NVIDIA GPU", "reads KV layouts dense-v1 only; kv_storage 'mine' provides opaque")
