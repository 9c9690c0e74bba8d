"""A local fleet: N `refinery serve` replicas behind nginx with pair affinity, on loopback (`fleet.py`)."""
