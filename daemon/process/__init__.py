"""The daemon process (SPEC 3): the root nursery, signals, logging, systemd notification."""
