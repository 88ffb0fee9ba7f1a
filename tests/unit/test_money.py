"""Money at the edges: text and Decimal in, integer µUSD inside, exact text out."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.money import (
    MICROS_PER_USD,
    cents_to_micros,
    micros_to_cents,
    micros_to_usd,
    micros_to_usd_str,
    usd_to_micros,
)


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0.10", 100_000),
        ("1", 1_000_000),
        (3, 3_000_000),
        (Decimal("0.000001"), 1),
        ("1e-6", 1),
        ("1E2", 100_000_000),
        ("0", 0),
        ("9007199254.740991", 2**53 - 1),
    ],
)
def test_amounts_are_read_exactly(value: str | int | Decimal, micros: int) -> None:
    assert usd_to_micros(value) == micros


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("0.0000001", 1),
        ("0.0000010001", 2),
        ("1.0000001", 1_000_001),
        ("-0.0000019", -1),
    ],
)
def test_fractions_of_a_micro_dollar_round_up(value: str, micros: int) -> None:
    # Up, never to the nearest: a budget read from text is never made larger.
    assert usd_to_micros(value) == micros


@pytest.mark.parametrize(
    "value",
    ["", "abc", "1,5", "$1", "0x10", "1.2.3", "NaN", "nan", "Infinity", "-inf", "sNaN", True],
)
def test_what_is_not_a_finite_amount_is_refused(value: str | bool) -> None:
    with pytest.raises(ValueError, match="amount"):
        usd_to_micros(value)


@pytest.mark.parametrize("value", [0.1, 1.0, float("nan"), float("inf")])
def test_floats_are_refused(value: float) -> None:
    with pytest.raises(TypeError, match="never a float"):
        usd_to_micros(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (90_000, "0.090000"),
        (1_234_567, "1.234567"),
        (-5, "-0.000005"),
        (2**53 - 1, "9007199254.740991"),
        (10**18 + 1, "1000000000000.000001"),
    ],
)
def test_text_output_is_exact_to_the_micro_dollar(micros: int, text: str) -> None:
    assert micros_to_usd_str(micros) == text
    assert usd_to_micros(text) == micros


@pytest.mark.parametrize("micros", [0, 1, 7, 90_000, 123_456_789, 999_999_999_999])
def test_json_numbers_read_back_as_the_same_micro_dollars(micros: int) -> None:
    # A JSON number is a float to most readers; up to a million dollars its shortest text
    # still names the exact amount.
    assert usd_to_micros(repr(micros_to_usd(micros))) == micros


def test_cents_convert_down_never_up() -> None:
    assert cents_to_micros(1) == MICROS_PER_USD // 100
    assert cents_to_micros(250) == 2_500_000
    assert micros_to_cents(19_999) == 1
    assert micros_to_cents(20_000) == 2
    assert micros_to_cents(9_999) == 0


@given(st.integers(-(10**20), 10**20))
def test_text_output_equals_decimal_formatting(micros: int) -> None:
    # The integer formatting replaced Decimal's; any amount prints as Decimal printed it.
    assert micros_to_usd_str(micros) == f"{Decimal(micros) / 1_000_000:.6f}"
