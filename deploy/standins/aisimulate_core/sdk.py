"""STAND-IN for ``aisimulate_core.sdk``: the names Dynamo 1.6.1 imports, unusable.

See the package docstring: every class here raises :class:`ImportError` when used.
"""

from __future__ import annotations

from typing import NoReturn

from aisimulate_core import StandInClass, missing
from aisimulate_core._native import RustForwardPassPerfModel


class ForwardPassPerfModelConfig(StandInClass):
    """Stands in for the SDK's perf-model configuration (a dataclass in the real SDK)."""


def __getattr__(name: str) -> NoReturn:
    # Any other SDK name (config, models, perf_database, ...): the same clear ImportError.
    missing("aisimulate_core.sdk", name)


__all__ = ["ForwardPassPerfModelConfig", "RustForwardPassPerfModel"]
