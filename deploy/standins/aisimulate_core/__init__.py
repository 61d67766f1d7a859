"""STAND-IN for ``aisimulate_core`` (the AISimulate perf-model SDK): not the real package.

The real ``aisimulate-core`` is not on PyPI, and every ``aisimulate`` there is a stub that
downloads it from outside the package registries, so it cannot be installed here. The
Dynamo Planner 1.6.1 imports two names from it at module load
(``aisimulate_core.sdk.ForwardPassPerfModelConfig`` and
``aisimulate_core.sdk.RustForwardPassPerfModel`` / ``aisimulate_core._native``), although its
load-based scaling never uses them. This package provides those names so the Planner
*starts*; using any of them raises :class:`ImportError` (which the Planner already catches
where it builds an AISimulate perf model), exactly as if the package were missing.

Installed into dynamo-local's virtualenv by ``scripts/setup.sh``; see ``../README.md``.
"""

from __future__ import annotations

from typing import Any, NoReturn

STANDIN = True
"""Marker: code (and people) can tell this is the stand-in, not the real SDK."""

__version__ = "0+standin"

MESSAGE = (
    "aisimulate_core is a stand-in installed by dynamo-local (deploy/standins): the real "
    "AISimulate SDK (aisimulate-core) is not on PyPI and cannot be installed from the "
    "package registries, so {what} is unavailable. Load-based Planner scaling does not "
    "need it; SLA scaling with an AISimulate perf model does."
)


def unavailable(what: str) -> NoReturn:
    """Raise the stand-in's :class:`ImportError` for ``what``."""
    raise ImportError(MESSAGE.format(what=what), name="aisimulate_core")


def missing(owner: str, name: str) -> NoReturn:
    """A name the stand-in lacks: :class:`AttributeError` for dunders, so introspection
    (``hasattr(x, "__wrapped__")``, pydantic's schema hooks, pickling) behaves as usual;
    the stand-in's :class:`ImportError` for everything else."""
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(f"{owner!r} has no attribute {name!r}")
    unavailable(f"{owner}.{name}")


class _Unavailable(type):
    """Metaclass of a stand-in class: constructing it or reading any attribute of the class
    (``normalize_config``, ``from_dict``, ...) raises :class:`ImportError`; dunders behave
    as on any class, so importing, annotations and introspection still work."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        unavailable(f"{cls.__module__}.{cls.__qualname__}")

    def __getattr__(cls, name: str) -> NoReturn:
        # Only called for attributes the class does not have.
        missing(f"{cls.__module__}.{cls.__qualname__}", name)


class StandInClass(metaclass=_Unavailable):
    """Base of every stand-in class."""


def __getattr__(name: str) -> NoReturn:
    # ``from aisimulate_core import anything_else`` fails like a missing package would.
    missing("aisimulate_core", name)
