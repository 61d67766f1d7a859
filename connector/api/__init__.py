"""The HTTP API's parts: route table, handlers, validation, errors, auth, SSE, health.

``connector.server.create_app`` assembles them into an aiohttp application; the OpenAPI
document (``connector.openapi``) is generated from the same route table.
"""
