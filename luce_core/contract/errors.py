"""One exception family: every error a user can cause names its cause and a remedy."""
from __future__ import annotations


class LuceError(Exception):
    """Base of all user-facing errors. The CLI prints these without a traceback."""

    def __init__(self, message: str, remedy: str | None = None):
        super().__init__(message)
        self.message = message
        self.remedy = remedy

    def __str__(self) -> str:
        return self.message if not self.remedy else f"{self.message}\n  remedy: {self.remedy}"


class ModelFileError(LuceError):
    """The model file is missing, truncated, corrupt or not a GGUF."""


class UnsupportedModelError(LuceError):
    """The file is valid but describes something luce cannot run (architecture, tensor type)."""


class SelectionError(LuceError):
    """No implementation of a role can run here, or a forced one cannot."""


class PluginError(LuceError):
    """A plugin failed to load or declares hooks the core does not know."""


class ContextOverflowError(LuceError):
    """The prompt (plus the tokens asked for) does not fit in the context."""


class ConfigError(LuceError):
    """An option value is invalid or a combination of options is unsupported."""


class SnapshotError(LuceError):
    """A KV snapshot is corrupt, truncated, or incompatible with the store it is restored into."""


class DeviceMemoryError(LuceError):
    """The plan needs more device memory than is free."""


class KernelError(LuceError):
    """An implementation failed at first use (a kernel that does not compile or load). Unless
    the user forced that implementation, luce falls back to the next candidate with a warning."""
