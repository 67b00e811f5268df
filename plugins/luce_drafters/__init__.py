"""luce_drafters: drafters for speculative decoding (prompt lookup, draft model, DFlash) and
``train-drafter``. The verify/accept engine is ``luce_core.speculative``."""
