"""The HTTP API's parts: route table, handlers, validation, errors, auth, SSE, health.

``connector.api.server.create_app`` assembles them into an aiohttp application; the OpenAPI
document (``connector.api.openapi``) is generated from the same route table.
"""
