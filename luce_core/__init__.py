"""luce core: roles (hookspecs), plugin manager, capability probe, selection, model graph, engine.

Importing this package is cheap: no torch, no CUDA. Heavy modules are imported where used.
"""
from luce_core.contract.errors import LuceError
from luce_core.contract.hookspecs import hookimpl
from luce_core.contract.impl import Impl

__version__ = "0.1.0"
__all__ = ["Impl", "LuceError", "hookimpl", "__version__"]
