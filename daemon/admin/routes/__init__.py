"""The admin API's routes, one module per resource; each ``register(app, host)`` adds its own."""
