"""The job engine: dispatcher, workers, the outcome decision (SPEC 6.1), retry backoff."""
