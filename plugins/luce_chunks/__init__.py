"""luce_chunks (work in progress)."""
