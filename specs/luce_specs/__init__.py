"""luce_specs: one hypothesis conformance suite per role.

Each ``test_<role>.py`` runs over every installed implementation of its role that can run on
this machine; run them on one plugin with ``luce specs --plugin NAME`` (or
``python -m luce_specs.runner --plugin NAME``).
"""

# hypothesis examples per spec test, when set (see luce_specs.hyp); kept here so the runner can
# name it without importing hypothesis before pytest starts
MAX_EXAMPLES_ENV = "LUCE_SPECS_MAX_EXAMPLES"
