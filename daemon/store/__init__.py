"""The store: all SQL, the schema and its migrations, and the one thread hop to the database."""
