"""Client side of the lease protocol."""
