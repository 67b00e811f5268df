"""luce_drafters (work in progress)."""
