"""Tests of streams.money: exact major <-> minor unit conversion and the currency table."""

from __future__ import annotations

import json
from decimal import Context, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sardis_ledger.streams import money
from sardis_ledger.streams.errors import ConfigError, LedgerError
from sardis_ledger.streams.money import (
    BUILTIN_CURRENCIES,
    CURRENCY_CODE_LENGTH_MAX,
    DECIMALS_MAX,
    Currency,
    currency_table,
    to_major,
    to_minor,
    to_wire,
)

# ------------------------------------------------------------------ to_minor


@pytest.mark.parametrize(
    ("amount", "decimals", "expected"),
    [
        (Decimal("100.50"), 2, 10050),
        (Decimal("100.5"), 2, 10050),
        (Decimal("100"), 2, 10000),
        (Decimal("0.01"), 2, 1),
        (Decimal("-1.23"), 2, -123),
        (Decimal("0"), 2, 0),
        (Decimal("-0"), 2, 0),
        (Decimal("0E+7"), 2, 0),
        (Decimal("1E+2"), 2, 10000),  # positive exponent
        (Decimal("1.000"), 2, 100),  # trailing zeros past the scale are fine
        (Decimal("1.500000000000000000"), 2, 150),
        (Decimal("1"), 0, 1),
        (Decimal("1.0"), 0, 1),
        (Decimal("12345"), 0, 12345),
        (Decimal("1.000000000000000001"), 18, 10**18 + 1),
        (Decimal("0.000000000000000001"), 18, 1),
        (Decimal("0.0000000000000000010"), 18, 1),
        (Decimal("-0.000000000000000001"), 18, -1),
        (Decimal("340282366920938463463.374607431768211456"), 18, 2**128),
        (Decimal("1.23456789"), 8, 123456789),
    ],
)
def test_to_minor_exact(amount: Decimal, decimals: int, expected: int) -> None:
    result = to_minor(amount, decimals)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("amount", "decimals"),
    [
        (Decimal("0.001"), 2),
        (Decimal("1.001"), 2),
        (Decimal("-1.001"), 2),
        (Decimal("1.5"), 0),
        (Decimal("0.5"), 0),
        (Decimal("0.0000000000000000001"), 18),  # 19 decimals
        (Decimal("1.0000000000000000010"), 17),
        (Decimal("100000000000000000000000000000000000000000000000000.001"), 2),
        (Decimal("NaN"), 2),
        (Decimal("-NaN"), 2),
        (Decimal("sNaN"), 2),
        (Decimal("Infinity"), 2),
        (Decimal("-Infinity"), 18),
    ],
)
def test_to_minor_refuses_what_it_would_have_to_round(amount: Decimal, decimals: int) -> None:
    assert to_minor(amount, decimals) is None


def test_to_minor_is_exact_where_the_default_context_would_round() -> None:
    big = Decimal(10**50 + 1)
    # The premise: ordinary Decimal arithmetic (28 digits) loses the trailing 1.
    assert big * 100 != Decimal((10**50 + 1) * 100)
    assert to_minor(big, 2) == (10**50 + 1) * 100
    assert to_minor(Decimal("100000000000000000000000000000000000000000000000000.01"), 2) == 10**52 + 1
    assert to_minor(Decimal(f"{10**50 + 1}.000000000000000001"), 18) == (10**50 + 1) * 10**18 + 1


def test_to_minor_does_not_depend_on_the_context_precision() -> None:
    amount = Decimal("123456789012345678901234567890.123456789012345678")
    with localcontext() as context:
        context.prec = 3
        assert to_minor(amount, 18) == 123456789012345678901234567890123456789012345678


@given(coefficient=st.integers(min_value=-10**200, max_value=10**200),
       exponent=st.integers(min_value=-150, max_value=90),
       decimals=st.integers(min_value=0, max_value=DECIMALS_MAX))
def test_to_minor_fast_path_agrees_with_the_digit_tuple(coefficient: int, exponent: int,
                                                         decimals: int) -> None:
    # Coefficients up to 200 digits cover both ways: the exact context takes up to 96, longer
    # ones (trailing zeros, or digits it would have to round) fall back to the digit tuple.
    amount = Decimal(coefficient).scaleb(exponent, Context(prec=400))
    assert to_minor(amount, decimals) == money._to_minor_by_digits(amount, decimals)


def test_to_minor_takes_trailing_zeros_past_the_exact_context() -> None:
    amount = Decimal("1.5" + "0" * 300)  # 302 digits: the exact context cannot hold it
    assert to_minor(amount, 2) == 150
    assert to_minor(Decimal("1.5" + "0" * 300 + "1"), 2) is None


# ------------------------------------------------------------------ to_major / to_wire


@pytest.mark.parametrize(
    ("minor", "decimals", "expected"),
    [
        (10050, 2, "100.50"),
        (0, 2, "0.00"),
        (-5, 2, "-0.05"),
        (1, 0, "1"),
        (-7, 0, "-7"),
        (123456789, 8, "1.23456789"),
        (10**18 + 1, 18, "1.000000000000000001"),
        (10**50 + 1, 0, str(10**50 + 1)),
        (2**128, 6, "340282366920938463463374607431768.211456"),
    ],
)
def test_to_major(minor: int, decimals: int, expected: str) -> None:
    major = to_major(minor, decimals)
    assert major == Decimal(expected)
    assert major.as_tuple().exponent == -decimals
    assert f"{major:f}" == expected


@pytest.mark.parametrize(
    ("minor", "decimals", "expected"),
    [
        (10050, 2, "100.500000000000000000"),
        (0, 2, "0.000000000000000000"),
        (0, 18, "0.000000000000000000"),
        (-1, 18, "-0.000000000000000001"),
        (1, 0, "1.000000000000000000"),
        (-123, 2, "-1.230000000000000000"),
        (2**128, 18, "340282366920938463463.374607431768211456"),
        (10**50 + 1, 2, f"{10**48}.010000000000000000"),
    ],
)
def test_to_wire(minor: int, decimals: int, expected: str) -> None:
    wire = to_wire(minor, decimals)
    assert wire == Decimal(expected)
    assert wire.as_tuple().exponent == -DECIMALS_MAX
    assert f"{wire:f}" == expected


def test_to_major_of_zero_is_not_negative_zero() -> None:
    assert not to_major(0, 2).is_signed()
    assert not to_wire(0, 2).is_signed()


def _exact_digits(value: Decimal) -> tuple[int, str, int]:
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    return sign, "".join(map(str, digits)), exponent


MINOR = st.integers(min_value=-(10**40), max_value=10**40)
DECIMALS = st.integers(min_value=0, max_value=DECIMALS_MAX)


@given(minor=MINOR, decimals=DECIMALS)
def test_major_round_trip(minor: int, decimals: int) -> None:
    major = to_major(minor, decimals)
    assert to_minor(major, decimals) == minor
    # Checked on the digit tuple: comparing Decimals through arithmetic could round.
    sign, digits, exponent = _exact_digits(major)
    assert (sign, int(digits), exponent) == (int(minor < 0), abs(minor), -decimals)


@given(minor=MINOR, decimals=DECIMALS)
def test_wire_round_trip(minor: int, decimals: int) -> None:
    wire = to_wire(minor, decimals)
    assert to_minor(wire, decimals) == minor
    sign, digits, exponent = _exact_digits(wire)
    assert exponent == -DECIMALS_MAX
    assert int(digits) == abs(minor) * 10 ** (DECIMALS_MAX - decimals)
    assert sign == int(minor < 0)
    assert wire == to_major(minor, decimals)


@given(minor=MINOR, decimals=st.integers(min_value=0, max_value=DECIMALS_MAX - 1))
def test_one_digit_too_many_is_refused(minor: int, decimals: int) -> None:
    # minor + 0.1 units: one more decimal than the currency has, never rounded away.
    finer = to_major(minor * 10 + (1 if minor >= 0 else -1), decimals + 1)
    assert to_minor(finer, decimals) is None
    assert to_minor(finer, decimals + 1) == minor * 10 + (1 if minor >= 0 else -1)


@given(minor=MINOR, decimals=DECIMALS, extra_zeros=st.integers(min_value=0, max_value=30))
def test_trailing_zeros_do_not_matter(minor: int, decimals: int, extra_zeros: int) -> None:
    padded = to_major(minor * 10**extra_zeros, decimals + extra_zeros)
    assert to_minor(padded, decimals) == minor


# ------------------------------------------------------------------ currency table


def test_builtin_table() -> None:
    table = currency_table({})
    assert table == dict(BUILTIN_CURRENCIES)
    assert table["USD"] == Currency("USD", 2)
    assert table["JPY"] == Currency("JPY", 0)
    assert table["USDC"] == Currency("USDC", 6)
    assert table["ETH"] == Currency("ETH", 18)
    assert table["BTC"] == Currency("BTC", 8)
    assert all(code == currency.code for code, currency in table.items())


def test_table_is_a_fresh_copy() -> None:
    table = currency_table({})
    table["XAU"] = Currency("XAU", 4)
    assert "XAU" not in BUILTIN_CURRENCIES
    assert "XAU" not in currency_table({})


@pytest.mark.parametrize("raw", ["", "   ", "\n"])
def test_empty_setting_means_builtins(raw: str) -> None:
    assert currency_table({"SARDIS_CURRENCIES": raw}) == dict(BUILTIN_CURRENCIES)


@pytest.mark.parametrize(
    ("raw", "added"),
    [
        ('{"XAU": 4}', {"XAU": 4}),
        ('{"XAU": 4, "ZERO": 0, "WEI18": 18}', {"XAU": 4, "ZERO": 0, "WEI18": 18}),
        ('{"ABCDEFGHIJKL": 2}', {"ABCDEFGHIJKL": 2}),  # 12 characters: the maximum
        ('{"USD": 2, "ETH": 18}', {}),  # repeating a built-in with its own scale is fine
        ("{}", {}),
    ],
)
def test_extension(raw: str, added: dict[str, int]) -> None:
    table = currency_table({"SARDIS_CURRENCIES": raw})
    expected = dict(BUILTIN_CURRENCIES)
    expected.update({code: Currency(code, decimals) for code, decimals in added.items()})
    assert table == expected


def test_extension_from_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARDIS_CURRENCIES", json.dumps({"XPT": 3}))
    assert currency_table()["XPT"] == Currency("XPT", 3)
    monkeypatch.delenv("SARDIS_CURRENCIES")
    assert "XPT" not in currency_table()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "not JSON"),
        ('{"XAU": 4', "not JSON"),
        ("[1, 2]", "JSON object"),
        ('"XAU"', "JSON object"),
        ("4", "JSON object"),
        ('{"": 2}', "bad currency code"),
        ('{"X-AU": 2}', "bad currency code"),
        ('{"X AU": 2}', "bad currency code"),
        ('{"XAU|1": 2}', "bad currency code"),
        ('{"' + "A" * (CURRENCY_CODE_LENGTH_MAX + 1) + '": 2}', "bad currency code"),
        ('{"XAU": 19}', "decimals must be 0..18"),
        ('{"XAU": -1}', "decimals must be 0..18"),
        ('{"XAU": 4.0}', "decimals must be 0..18"),
        ('{"XAU": "4"}', "decimals must be 0..18"),
        ('{"XAU": true}', "decimals must be 0..18"),
        ('{"XAU": null}', "decimals must be 0..18"),
        ('{"USD": 3}', "built in with 2 decimals"),
        ('{"ETH": 6}', "built in with 18 decimals"),
        ('{"JPY": 2}', "built in with 0 decimals"),
    ],
)
def test_bad_extension_is_a_config_error(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        currency_table({"SARDIS_CURRENCIES": raw})
    assert isinstance(caught.value, LedgerError)
    assert not caught.value.retriable
