"""Money as integers: micro-dollars (µUSD) everywhere, Decimal only at the edges.

A price in USD per million tokens times a token count is exactly µUSD, which is why
µUSD is the unit: no float ever touches a balance.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000
MICROS_PER_CENT = 10_000


def usd_to_micros(value: Decimal | int | str) -> int:
    """Whole µUSD, rounding fractions of a µUSD up (a budget is never made larger).

    A float is refused, not converted: it has already lost the amount it was meant to be
    (read money as text or Decimal)."""
    if isinstance(value, float):
        raise TypeError(f"money is never a float: {value!r}; pass a str or Decimal")
    try:
        amount = Decimal(str(value)) if not isinstance(value, Decimal) else value
    except InvalidOperation as exc:
        raise ValueError(f"not an amount: {value!r}") from exc
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {value!r}")
    return int((amount * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(micros: int) -> float:
    """For JSON output only: µUSD → dollars as a JSON number (6 decimals, exact in text)."""
    return float(Decimal(micros) / MICROS_PER_USD)


def micros_to_usd_str(micros: int) -> str:
    """For headers and tables: an exact decimal string such as '0.090000'.

    Integer arithmetic, not Decimal: it is in every admitted Check's headers, and
    formatting a Decimal took ~3 µs."""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{'-' if micros < 0 else ''}{whole}.{frac:06d}"


def cents_to_micros(cents: int) -> int:
    return cents * MICROS_PER_CENT


def micros_to_cents(micros: int) -> int:
    """Whole cents, rounded down (what has been spent, in the seed APIs' unit)."""
    return micros // MICROS_PER_CENT
