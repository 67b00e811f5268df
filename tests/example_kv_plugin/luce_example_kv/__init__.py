"""luce_example_kv: a third-party luce plugin providing one ``kv_storage`` implementation."""
