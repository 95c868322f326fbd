"""backfilld: cold-starts AT Protocol aggregators by backfilling collections into a durable records queue."""

__version__ = "0.1.0"
