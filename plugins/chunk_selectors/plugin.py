"""Descriptors of luce_chunks (imports nothing heavy)."""
from __future__ import annotations

from luce_core import Impl, hookimpl  # noqa: F401
