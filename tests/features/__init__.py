"""Feature registrations for the property harness, one module per area (see harness.py)."""
