"""luce_example: a minimal third-party luce plugin providing one ``linear`` implementation."""
