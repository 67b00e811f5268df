"""luce_specs: one hypothesis conformance suite per role.

Each ``test_<role>.py`` runs over every installed implementation of its role that can run on
this machine; run them on one plugin with ``luce specs --plugin NAME`` (or
``python -m luce_specs.runner --plugin NAME``).
"""
