"""Kubernetes resource quantities (``20Gi``, ``500m``, ``1e9``) as plain numbers.

A quantity is a decimal number with an optional suffix, as Kubernetes writes them:

- binary SI: ``Ki`` ``Mi`` ``Gi`` ``Ti`` ``Pi`` ``Ei`` (powers of 1024);
- decimal SI: ``n`` ``u`` ``m`` ``k`` ``M`` ``G`` ``T`` ``P`` ``E`` (powers of 1000);
- a decimal exponent: ``1e9``, ``2.5E3``.

Numbers are evaluated exactly (as fractions), so ``1.5Gi`` is exactly 1610612736 bytes and
no float rounding decides whether a value is whole. Every parser raises :class:`ValueError`
with a message that quotes the value and says what was expected.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
# Exponents beyond this are typos, not resources; refusing them keeps the arithmetic small.
_MAX_EXPONENT = 40

_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?:[eE](?P<exponent>[+-]?\d+)|(?P<binary>Ki|Mi|Gi|Ti|Pi|Ei)|(?P<decimal>[numkMGTPE]))?"
)

_EXPECTED = "a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E)"
# Memory is an integer count of bytes in this project; bigger than this is surely a mistake.
MAX_MEMORY_BYTES = 2**63 - 1


def parse_quantity(value: object) -> Fraction:
    """Any Kubernetes quantity (a string, an int or a float) as an exact fraction."""
    if isinstance(value, bool):  # YAML turns `yes`/`no` into booleans; not a quantity
        raise ValueError(f"expected {_EXPECTED}, got {value!r}")
    if isinstance(value, int):
        return Fraction(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {value!r}")
        # repr() is the shortest text that reads back as the same float: 0.1 stays 0.1.
        return Fraction(repr(value))
    if not isinstance(value, str):
        raise ValueError(f"expected {_EXPECTED}, got {type(value).__name__} {value!r}")
    text = value.strip()
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid quantity {value!r}: expected {_EXPECTED}, e.g. '512Mi'")
    number = Fraction(match["number"])
    if match["exponent"] is not None:
        exponent = int(match["exponent"])
        if abs(exponent) > _MAX_EXPONENT:
            raise ValueError(
                f"invalid quantity {value!r}: exponent {exponent} is out of range "
                f"(-{_MAX_EXPONENT}..{_MAX_EXPONENT})"
            )
        return number * Fraction(10) ** exponent
    if match["binary"] is not None:
        return number * Fraction(1024) ** _BINARY[match["binary"]]
    return number * Fraction(10) ** _DECIMAL[match["decimal"] or ""]


def parse_memory(value: object) -> int:
    """Bytes from ``20Gi``, ``512Mi``, ``1G``, ``1e9`` or a plain integer.

    The result must be a whole, non-negative number of bytes: ``100m`` (a tenth of a byte,
    a classic slip for ``100M``) is refused rather than rounded.
    """
    amount = parse_quantity(value)
    if amount < 0:
        raise ValueError(f"memory must not be negative, got {value!r}")
    if amount.denominator != 1:
        raise ValueError(
            f"memory must be a whole number of bytes, got {value!r} ({float(amount):g} bytes)"
        )
    if amount > MAX_MEMORY_BYTES:
        raise ValueError(f"memory {value!r} is too large (more than {MAX_MEMORY_BYTES} bytes)")
    return int(amount)


def parse_cpu(value: object) -> float:
    """Cores from ``500m``, ``2`` or ``1.5``."""
    amount = parse_quantity(value)
    if amount < 0:
        raise ValueError(f"cpu must not be negative, got {value!r}")
    return float(amount)


def parse_gpu(value: object) -> float:
    """GPUs from ``1``, ``2`` or ``"0.5"``: a whole number, or a fraction of one GPU (< 1).

    A fraction shares one GPU; more than one GPU must be whole (1.5 GPUs cannot be placed).
    """
    amount = parse_quantity(value)
    if amount < 0:
        raise ValueError(f"gpu must not be negative, got {value!r}")
    if amount > 1 and amount.denominator != 1:
        raise ValueError(f"gpu must be a whole number or a fraction below 1, got {value!r}")
    return float(amount)


def format_memory(num_bytes: int) -> str:
    """``num_bytes`` as an exact quantity: ``2**30`` -> ``"1Gi"``, ``5000`` -> ``"5k"``.

    Uses the largest binary suffix that divides the value, else the largest decimal one,
    else plain bytes (``1536`` -> ``"1536"``), so :func:`parse_memory` reads it back exactly.
    """
    if num_bytes < 0:
        raise ValueError(f"memory must not be negative, got {num_bytes}")
    if num_bytes == 0:
        return "0"
    for suffix, power in sorted(_BINARY.items(), key=lambda item: -item[1]):
        unit = 1024**power
        if num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    for suffix, power in sorted(_DECIMAL.items(), key=lambda item: -item[1]):
        if power <= 0:
            break
        unit = 10**power
        if num_bytes % unit == 0:
            return f"{num_bytes // unit}{suffix}"
    return str(num_bytes)


def approx_memory(num_bytes: int) -> str:
    """``num_bytes`` for a message, in the largest binary unit it reaches, to one decimal
    where it is not a whole number of that unit: ``3282042880`` -> ``"3.1Gi"``,
    ``300 * 2**20`` -> ``"300Mi"``, ``512`` -> ``"512"``. For measured amounts; requests and
    limits read back exactly with :func:`format_memory`."""
    if num_bytes < 0:
        raise ValueError(f"memory must not be negative, got {num_bytes}")
    for suffix, power in sorted(_BINARY.items(), key=lambda item: -item[1]):
        unit = 1024**power
        if num_bytes >= unit:
            whole, rest = divmod(num_bytes, unit)
            return f"{whole}{suffix}" if rest == 0 else f"{num_bytes / unit:.1f}{suffix}"
    return str(num_bytes)
