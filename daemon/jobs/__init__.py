"""The job handlers: discovery (relay), backfill (PDS), and DID resolution."""
