"""luce: fast local LLM inference on GGUF models.

    import luce
    llm = luce.load()                       # the embedded default model (SmolLM2-135M-Instruct Q4_1)
    for piece in llm.generate("The capital of France is", max_tokens=16):
        print(piece, end="")
"""
from luce_core import LuceError, __version__, hookimpl
from luce_core.api import LLM, load

__all__ = ["LLM", "LuceError", "__version__", "hookimpl", "load"]
