"""luce_drafters: drafters for speculative decoding (prompt lookup, draft model, DFlash). The
verify/accept engine is ``luce_core.speculative``; training a DFlash drafter is a tool
(``luce_tools.train_drafter``)."""
