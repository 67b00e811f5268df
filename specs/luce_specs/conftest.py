"""Enables the spec plugin when pytest collects specs/ from the repository root.

The runner (``luce specs``) passes ``-p luce_specs.plugin`` instead; pytest keys plugins by this
exact name, so the two paths never register it twice.
"""
pytest_plugins = ["luce_specs.plugin"]
