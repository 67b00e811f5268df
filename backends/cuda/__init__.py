"""luce_cuda (work in progress)."""
