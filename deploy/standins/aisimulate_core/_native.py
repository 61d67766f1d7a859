"""STAND-IN for ``aisimulate_core._native`` (a compiled Rust extension in the real SDK).

See the package docstring: every class here raises :class:`ImportError` when used.
"""

from __future__ import annotations

from typing import NoReturn

from aisimulate_core import StandInClass, missing


class RustForwardPassPerfModel(StandInClass):
    """Stands in for the native forward-pass perf model."""


def __getattr__(name: str) -> NoReturn:
    missing("aisimulate_core._native", name)


__all__ = ["RustForwardPassPerfModel"]
