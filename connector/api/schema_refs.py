"""What every schema module of the API shares: the type of a schema and how one names
another (``$ref`` into ``#/components/schemas``)."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}
