"""Shared fixtures: the real model, and a clean plugin host per test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from luce_core import plugin_host


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched into luce's cache on first use)."""
    from luce_core.default_model import default_model_path

    return Path(os.environ["LUCE_TEST_MODEL"]) if os.environ.get("LUCE_TEST_MODEL") else default_model_path(progress=False)


@pytest.fixture(autouse=True)
def _fresh_plugin_host():
    """Each test sees a plugin host built from the current environment."""
    plugin_host.reset()
    yield
    plugin_host.reset()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: thread wake-ups cost more than they save (and CI's 2 cores are shared)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
