"""Spec of the ``attention`` role: causal GQA attention and explicit (tree) masks, as bool masks
and as ``luce_core.speculative.tree.TreeMask``, over a KV store written by the torch reference store, against
softmax(q k^T * scale + mask) v in float64; an implementation that declares it reads any store
(``Impl.reads_kv_layouts=None``) also over a store offering only the protocol's required members."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from luce_core.plugin_api import DEFAULT_KV, KVSpec, ModelConfig, RunConfig, TreeMask, optional
from luce_specs import oracles
from luce_specs.hyp import spec_settings

LUCE_ROLE = "attention"
N_LAYERS = 2


def _geometry(head_dim: int, ratio: int) -> tuple[int, int]:
    n_kv = 1 if ratio == 8 else 2
    return n_kv * ratio, n_kv


def _config(head_dim: int, ratio: int, kv_dtype: str) -> RunConfig:
    n_heads, n_kv = _geometry(head_dim, ratio)
    model = ModelConfig(arch="llama", n_layers=N_LAYERS, hidden=n_heads * head_dim, ffn=4 * head_dim,
                        n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, vocab=256, ctx_train=256)
    return RunConfig(model=model, kv_k=kv_dtype, kv_v=kv_dtype)


# The cache is the torch reference store in the default dtype (kernels read f16/bf16 caches);
# the oracle reads back what the store holds, so the cache dtype adds no error of its own.
LUCE_VARIANTS = {f"hd{d}-gqa{r}": _config(d, r, DEFAULT_KV[0]) for d in (64, 128) for r in (1, 3, 8)}
LUCE_VARIANTS.update({f"hd{d}-gqa{r}-bf16": _config(d, r, "bf16") for d, r in ((64, 3), (128, 8))})
SETTINGS = spec_settings(15)


def _filled_store(subject, gen: torch.Generator, end: int):
    """A torch reference store whose positions [0, end) of every layer hold random K/V."""
    from luce_torch.kv import TorchKVStorage

    c = subject.config
    m = c.model
    spec = KVSpec(n_layers=N_LAYERS, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, capacity=end + 3,
                  k_dtype=c.kv_k, v_dtype=c.kv_v, device=subject.device, compute_dtype="f32")
    store = TorchKVStorage().allocate(spec)
    for li in range(N_LAYERS):  # the other layer holds different data: reading it is a bug
        k = torch.randn(end, m.n_kv_heads, m.head_dim, generator=gen)
        v = torch.randn(end, m.n_kv_heads, m.head_dim, generator=gen)
        store.write(li, 0, k.to(subject.device), v.to(subject.device))
    return store


def _check(subject, q: torch.Tensor, store, layer: int, start: int, scale: float,
           allowed: torch.Tensor, mask: torch.Tensor | TreeMask | None) -> None:
    attn = subject.create()
    out = attn.forward(q.to(subject.device), store, layer, start, scale=scale,
                       mask=mask.to(subject.device) if isinstance(mask, torch.Tensor) else mask)
    assert out.shape == q.shape
    k, v = store.read(layer, start + q.shape[0])
    expected = oracles.attention(store.rotate_query(q.to(subject.device)).cpu(), k.cpu(), v.cpu(), allowed, scale)
    # FP16 operands inside a kernel are allowed (~1e-3 here); one key too many or too few, or a
    # wrong head mapping, moves the output by >1e-2
    torch.testing.assert_close(out.detach().cpu().double(), expected, atol=5e-3, rtol=5e-3)


@SETTINGS
@given(t=st.integers(1, 12), start=st.integers(0, 24), layer=st.integers(0, N_LAYERS - 1),
       scale_factor=st.sampled_from([0.5, 1.0, 2.5]), seed=st.integers(0, 2**31 - 1))
def test_causal_matches_reference(subject, t: int, start: int, layer: int, scale_factor: float, seed: int) -> None:
    m = subject.config.model
    gen = torch.Generator().manual_seed(seed)
    store = _filled_store(subject, gen, start + t)
    store.set_length(start)
    q = torch.randn(t, m.n_heads, m.head_dim, generator=gen)
    scale = scale_factor / math.sqrt(m.head_dim)
    _check(subject, q, store, layer, start, scale, oracles.causal_mask(start, t), None)


@st.composite
def _trees(draw: st.DrawFn) -> list[int]:
    n = draw(st.integers(2, 9))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


@SETTINGS
@given(parents=_trees(), start=st.integers(0, 16), seed=st.integers(0, 2**31 - 1))
def test_tree_mask_matches_reference(subject, parents: list[int], start: int, seed: int) -> None:
    m = subject.config.model
    gen = torch.Generator().manual_seed(seed)
    t = len(parents)
    store = _filled_store(subject, gen, start + t)
    store.set_length(start)
    q = torch.randn(t, m.n_heads, m.head_dim, generator=gen)
    mask = oracles.tree_mask(start, parents)
    _check(subject, q, store, 1, start, 1 / math.sqrt(m.head_dim), mask, mask)
    # the same mask as a TreeMask (per-row path tables, the static form graphs replay)
    tm = TreeMask.from_dense(mask, start, subject.device)
    assert tm is not None
    _check(subject, q, store, 1, start, 1 / math.sqrt(m.head_dim), mask, tm)


class _Opaque:
    """A store reached only through the KVStore protocol's required members (none of the
    optional ones, no layout view): what a third-party store may be."""

    def __init__(self, store):
        self._s = store
        self.spec = store.spec

    @property
    def length(self) -> int:
        return self._s.length

    def write(self, layer, start, k, v):
        self._s.write(layer, start, k, v)

    def read(self, layer, end):
        return self._s.read(layer, end)

    def rotate_query(self, q):
        return self._s.rotate_query(q)

    def set_length(self, n):
        self._s.set_length(n)

    def snapshot(self):
        return self._s.snapshot()

    def restore(self, snap):
        self._s.restore(snap)

    @property
    def bytes_per_token(self):
        return self._s.bytes_per_token

    @property
    def nbytes(self):
        return self._s.nbytes


@spec_settings(8)
@given(t=st.integers(1, 12), start=st.integers(0, 24), seed=st.integers(0, 2**31 - 1))
def test_reads_any_store_through_the_protocol(subject, t: int, start: int, seed: int) -> None:
    """An implementation declaring ``reads_kv_layouts=None`` is paired with every store, opaque
    ones too: it must need nothing but the protocol's required members."""
    if subject.impl.reads_kv_layouts is not None:
        pytest.skip(f"reads only the KV layouts {', '.join(subject.impl.reads_kv_layouts)}")
    m = subject.config.model
    gen = torch.Generator().manual_seed(seed)
    store = _filled_store(subject, gen, start + t)
    store.set_length(start)
    q = torch.randn(t, m.n_heads, m.head_dim, generator=gen)
    _check(subject, q, _Opaque(store), 0, start, 1 / math.sqrt(m.head_dim), oracles.causal_mask(start, t), None)


def test_declared_members(subject) -> None:
    """Optional members, where present, have the declared types; a declared layout is known."""
    chunk = optional(subject.create(), "attention", "prefill_chunk")
    assert isinstance(chunk, int) and chunk >= 0, f"prefill_chunk must be a token count >= 0, got {chunk!r}"
    reads = subject.impl.reads_kv_layouts
    assert reads is None or (isinstance(reads, tuple) and all(isinstance(x, str) and x for x in reads))
