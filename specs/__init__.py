"""luce_specs: one hypothesis conformance suite per role."""
