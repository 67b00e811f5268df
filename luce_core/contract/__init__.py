"""What plugins may rely on, versioned: hook specifications, implementation descriptors, the
data that crosses role boundaries, one protocol per role (with every optional member declared),
the drafter contract, the layer-ops protocol and the error family.

``CONTRACT_VERSION`` is "MAJOR.MINOR". A plugin states the version it was built against on its
descriptors (``Impl(contract=...)``); the core refuses an implementation of another major
version, with the reason shown by ``luce doctor``. Minor versions only add optional members.

An ``Impl`` that states no version is refused too ("states no contract version"): taking it for
the current version would hide exactly the mismatch the version exists to show, and taking it
for 1.0 would only postpone that to the first 2.0.
"""
CONTRACT_VERSION = "1.0"
