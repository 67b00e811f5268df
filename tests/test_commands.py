"""``luce`` subcommands: the core's own three, the ones plugins add through register_commands
(a broken plugin skipped, a name taken twice refused), the shared tool harness, and the refused
--chunk-selector."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import pytest

from luce_core import cli, hookimpl, plugin_host
from luce_core.contract.errors import ConfigError, PluginError

CORE = {"generate", "doctor", "plugins"}
TOOLS = {"bench", "train-drafter", "model", "quality", "cuda"}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("LUCE_PLUGINS", "LUCE_DISABLE_PLUGINS", "LUCE_CHUNK_SELECTOR"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# ----------------------------------------------------------------------------- the command tree
def test_plugins_add_the_tool_commands(clean_env, capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands(cli.build_parser())
    assert set(commands) == CORE | TOOLS | {"specs"}
    assert set(_commands(commands["model"])) == {"synth", "widen", "truncate"}
    assert set(_commands(commands["quality"])) == {"kv", "weights"}
    assert set(_commands(commands["cuda"])) == {"profile", "gemv"}
    assert cli.main(["plugins"]) == 0  # lists each plugin's commands under it
    listing = capsys.readouterr().out
    tools = listing[listing.index("\ntools  ("):].split("\n")[2:7]
    assert [line.split()[-1] for line in tools] == sorted(TOOLS) and "luce specs" in listing


def test_the_core_cli_needs_no_plugin(clean_env) -> None:
    clean_env.setenv("LUCE_PLUGINS", "")  # load no plugin at all
    assert set(_commands(cli.build_parser())) == CORE
    clean_env.setenv("LUCE_PLUGINS", "torch,gguf")  # runtime plugins only: no tools, no specs
    plugin_host.reset()
    assert set(_commands(cli.build_parser())) == CORE
    with pytest.raises(SystemExit):
        cli.main(["bench"])


def test_building_the_parser_imports_no_tool() -> None:
    """`luce --help` must stay fast: the tools' own modules (numpy, torch) load when one runs."""
    code = ("import json, sys; from luce_core import cli; p = cli.build_parser(); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'tqdm'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


class _Adds:
    """A plugin whose register_commands adds ``names`` (then fails, with ``fail``)."""

    def __init__(self, *names: str, fail: bool = False):
        self.names, self.fail = names, fail

    @hookimpl
    def register_commands(self, subparsers: argparse._SubParsersAction) -> None:
        for name in self.names:
            subparsers.add_parser(name, help=f"the {name} command").set_defaults(func=lambda a: 0)
        if self.fail:
            raise RuntimeError("boom")


def _host(**plugins: _Adds) -> plugin_host.PluginHost:
    h = plugin_host.PluginHost(load_entrypoints=False)
    for name, plugin in plugins.items():
        h.register(plugin, name)
    return h


def _core_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    p = argparse.ArgumentParser(prog="luce")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("generate", help="the core's")
    return p, sub


def test_a_broken_plugin_is_skipped_with_a_warning() -> None:
    p, sub = _core_parser()
    h = _host(broken=_Adds("half", fail=True), good=_Adds("fine"))
    with pytest.warns(UserWarning, match=r"'broken' failed to add its commands \(boom\)"):
        owners = h.register_commands(sub)
    assert owners == {"generate": "luce", "fine": "good"}
    assert "half" not in sub.choices and "half" not in p.format_help()  # its half-added command is gone
    assert p.parse_args(["fine"]).func(None) == 0


@pytest.mark.parametrize("first, second, taken_from", [(None, "generate", "luce"), ("x", "x", "one")])
def test_a_command_name_taken_twice_is_a_plugin_error(first: str | None, second: str, taken_from: str) -> None:
    _, sub = _core_parser()
    plugins = {"one": _Adds(first)} if first else {}
    h = _host(**plugins, two=_Adds(second))
    with pytest.raises(PluginError, match=f"plugin 'two' adds the command '{second}', which '{taken_from}'") as e:
        h.register_commands(sub)
    assert "LUCE_DISABLE_PLUGINS" in e.value.remedy


def test_luce_reports_a_command_taken_twice(clean_env, capsys: pytest.CaptureFixture[str]) -> None:
    h = plugin_host.host()
    h.register(_Adds("bench"), "second-bench")
    assert cli.main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert "luce: error: plugin" in err and "'bench'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- the tool harness
def test_tool_commands_run_under_the_harness(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.gguf"
    shape = ["--hidden", "64", "--layers", "1", "--heads", "4", "--ffn", "64", "--quiet"]
    assert cli.main(["model", "synth", str(out), *shape]) == 0
    assert capsys.readouterr().err.startswith(f"wrote {out} (")
    # an OSError (no such folder) and a LuceError (a bad layer list): one line each, exit 2
    assert cli.main(["model", "synth", str(tmp_path / "no" / "such" / "m.gguf"), *shape]) == 2
    assert cli.main(["model", "truncate", str(out), str(tmp_path / "t.gguf"), "--layers", "3"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("luce: error: [Errno 2]") and "no/such" in errors[0]
    assert errors[1].startswith("luce: error: layers '3' are not within") and errors[2].startswith("  remedy:")
    # the same tool as `python -m`: the same arguments and rules
    from luce_tools.models.truncate import main

    assert main([str(out), str(tmp_path / "t.gguf"), "--layers", "3"]) == 2
    assert capsys.readouterr().err.startswith("luce: error: layers '3'")


# ----------------------------------------------------------------------------- luce specs
def test_specs_command_passes_its_arguments_to_the_runner(clean_env, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["specs", "--plugin", "torch", "--max-examples", "0"]) == 2
    assert "--max-examples must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["specs", "--help"])
    assert e.value.code == 0 and "--max-examples N" in capsys.readouterr().out


def test_specs_without_pytest_names_the_extra(clean_env, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # as if not installed
    assert cli.main(["specs", "--plugin", "torch"]) == 2
    err = capsys.readouterr().err
    assert "not installed: hypothesis" in err and "pip install 'luce[test]'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- --chunk-selector
REFUSED = "the chunk_selector role is not wired into generation yet; drop --chunk-selector"


@pytest.mark.parametrize("argv", [["generate", "hi", "-n", "1"], ["doctor"], ["bench", "--tg", "1"]])
def test_chunk_selector_flag_is_refused(clean_env, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert cli.main([*argv, "--chunk-selector", "lexical"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"luce: error: {REFUSED}") and "Traceback" not in err


def test_chunk_selector_environment_is_refused(clean_env) -> None:
    args = cli.build_parser().parse_args(["generate", "hi"])
    assert "chunk_selector" not in cli.run_overrides(args)
    clean_env.setenv("LUCE_CHUNK_SELECTOR", "auto")  # auto names none: accepted
    assert "chunk_selector" not in cli.run_overrides(args)
    clean_env.setenv("LUCE_CHUNK_SELECTOR", "lexical")
    with pytest.raises(ConfigError, match=REFUSED):
        cli.run_overrides(args)


def test_run_flags_are_plugin_api() -> None:
    from luce_core import plugin_api

    assert plugin_api.run_flags is cli.run_flags and plugin_api.run_overrides is cli.run_overrides
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = argparse.ArgumentParser()
        plugin_api.run_flags(p)
        kw = plugin_api.run_overrides(p.parse_args(["--kv-k", "q8_0", "--drafter", "prompt-lookup"]))
    assert kw["kv_k"] == "q8_0" and kw["drafter"] == "prompt-lookup" and kw["cuda_graphs"] is True
