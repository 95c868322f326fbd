"""The admin HTTP API (SPEC 5): app, routes by resource, request validation, server, token."""
