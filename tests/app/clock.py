"""The fixed server clock of the ``gate_app`` fixture (tests/app/conftest.py)."""

#: The server clock of the ``gate_app`` fixture, in milliseconds since the epoch.
GATE_APP_CLOCK_MS = 1_800_000_000_000
