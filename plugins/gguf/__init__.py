"""luce_gguf (work in progress)."""
