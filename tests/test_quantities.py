"""Kubernetes quantities: memory to bytes, cpu to cores, gpu to a count or a fraction."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.graph.quantities import (
    MAX_MEMORY_BYTES,
    approx_memory,
    format_memory,
    parse_cpu,
    parse_gpu,
    parse_memory,
    parse_quantity,
)

EXPECTED = "a number with an optional suffix (Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E)"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20Gi", 20 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1Ki", 1024),
        ("1.5Gi", 3 * 2**29),
        ("2Ti", 2 * 2**40),
        ("1Ei", 2**60),
        ("1G", 10**9),
        ("1k", 1000),
        ("128M", 128_000_000),
        ("1e9", 10**9),
        ("1E9", 10**9),
        ("2.5e3", 2500),
        ("1e+3", 1000),
        ("1E", 10**18),
        ("1000m", 1),
        (".5k", 500),
        ("  64Mi  ", 64 * 2**20),
        ("0", 0),
        (123, 123),
        (0, 0),
        (1e9, 10**9),
        (2.0, 2),
    ],
)
def test_memory_to_bytes(value: object, expected: int) -> None:
    assert parse_memory(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("12XB", f"invalid quantity '12XB': expected {EXPECTED}, e.g. '512Mi'"),
        ("", f"invalid quantity '': expected {EXPECTED}, e.g. '512Mi'"),
        ("Gi", f"invalid quantity 'Gi': expected {EXPECTED}, e.g. '512Mi'"),
        ("1 Gi", f"invalid quantity '1 Gi': expected {EXPECTED}, e.g. '512Mi'"),
        ("1gi", f"invalid quantity '1gi': expected {EXPECTED}, e.g. '512Mi'"),
        ("1e", f"invalid quantity '1e': expected {EXPECTED}, e.g. '512Mi'"),
        ("100m", "memory must be a whole number of bytes, got '100m' (0.1 bytes)"),
        ("1.5", "memory must be a whole number of bytes, got '1.5' (1.5 bytes)"),
        ("-1Gi", "memory must not be negative, got '-1Gi'"),
        (-5, "memory must not be negative, got -5"),
        ("16Ei", "memory '16Ei' is too large (more than 9223372036854775807 bytes)"),
        ("1e99", "invalid quantity '1e99': exponent 99 is out of range (-40..40)"),
        (True, f"expected {EXPECTED}, got True"),
        (None, f"expected {EXPECTED}, got NoneType None"),
        ([1], f"expected {EXPECTED}, got list [1]"),
        (float("nan"), "expected a finite number, got nan"),
    ],
)
def test_memory_errors_quote_the_value(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_memory(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("500m", 0.5),
        ("250m", 0.25),
        ("2", 2.0),
        ("1.5", 1.5),
        (2, 2.0),
        (0.5, 0.5),
        ("0", 0.0),
        ("1k", 1000.0),
    ],
)
def test_cpu_to_cores(value: object, expected: float) -> None:
    assert parse_cpu(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-500m", "cpu must not be negative, got '-500m'"),
        ("two", f"invalid quantity 'two': expected {EXPECTED}, e.g. '512Mi'"),
    ],
)
def test_cpu_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cpu(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1.0), (2, 2.0), ("1", 1.0), ("8", 8.0), ("0.5", 0.5), (0.25, 0.25), ("500m", 0.5),
     (0, 0.0), ("2.0", 2.0)],
)  # fmt: skip
def test_gpu_is_whole_or_a_fraction_of_one(value: object, expected: float) -> None:
    assert parse_gpu(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, "gpu must be a whole number or a fraction below 1, got 1.5"),
        ("2.5", "gpu must be a whole number or a fraction below 1, got '2.5'"),
        ("-1", "gpu must not be negative, got '-1'"),
        ("one", f"invalid quantity 'one': expected {EXPECTED}, e.g. '512Mi'"),
    ],
)
def test_gpu_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_gpu(value)
    assert str(info.value) == message


def test_quantities_are_exact() -> None:
    assert parse_quantity("0.1") == Fraction(1, 10)
    assert parse_quantity(0.1) == Fraction(1, 10)  # the float's shortest text, not its binary
    assert parse_quantity("1n") == Fraction(1, 10**9)
    assert parse_quantity("3u") == Fraction(3, 10**6)


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(0, "0"), (1024, "1Ki"), (2**30, "1Gi"), (3 * 2**29, "1536Mi"), (5000, "5k"),
     (10**9, "1G"), (1536, "1536"), (7, "7"), (2**60, "1Ei")],
)  # fmt: skip
def test_format_memory(num_bytes: int, text: str) -> None:
    assert format_memory(num_bytes) == text


def test_format_memory_refuses_negative() -> None:
    with pytest.raises(ValueError, match=r"^memory must not be negative, got -1$"):
        format_memory(-1)


@given(st.integers(min_value=0, max_value=MAX_MEMORY_BYTES))
def test_memory_round_trips_through_its_text(num_bytes: int) -> None:
    assert parse_memory(format_memory(num_bytes)) == num_bytes
    assert parse_memory(str(num_bytes)) == num_bytes


@given(
    st.integers(min_value=0, max_value=2**20),
    st.sampled_from([("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("k", 10**3), ("M", 10**6),
                     ("G", 10**9), ("", 1)]),
)  # fmt: skip
def test_memory_suffixes_multiply(number: int, suffix: tuple[str, int]) -> None:
    text, unit = suffix
    assert parse_memory(f"{number}{text}") == number * unit


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [
        (0, "0"),
        (512, "512"),
        (1536, "1.5Ki"),
        (300 << 20, "300Mi"),
        (302672 << 10, "295.6Mi"),
        (3282042880, "3.1Gi"),
        (16 << 30, "16Gi"),
        (3 << 40, "3Ti"),
    ],
)
def test_approx_memory_reads_well_in_messages(num_bytes: int, text: str) -> None:
    assert approx_memory(num_bytes) == text


def test_approx_memory_refuses_negative() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        approx_memory(-1)
