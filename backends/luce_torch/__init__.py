"""luce_torch: the reference backend. Runs on any torch device; the oracle for every other backend."""
