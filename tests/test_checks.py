"""The shared argument checks: what they accept, and the message of what they refuse."""

import math

import pytest

from lightning_ntk.checks import non_negative_int, non_negative_number, optional_seed, positive_int, positive_number


@pytest.mark.parametrize("bad", [0, -1, 1.0, True, "3", None])
def test_positive_int_refuses(bad):
    with pytest.raises(ValueError, match=r"`n` must be a positive int, got"):
        positive_int("n", bad)


@pytest.mark.parametrize("bad", [-1, 0.5, False])
def test_non_negative_int_refuses(bad):
    with pytest.raises(ValueError, match=r"`n` must be a non-negative int"):
        non_negative_int("n", bad)


@pytest.mark.parametrize("bad", [0, -1e-3, math.inf, math.nan, True, "1"])
def test_positive_number_refuses(bad):
    with pytest.raises(ValueError, match=r"`x` must be a positive finite number"):
        positive_number("x", bad)


@pytest.mark.parametrize("bad", [-1e-9, math.inf, math.nan, True])
def test_non_negative_number_refuses(bad):
    with pytest.raises(ValueError, match=r"`x` must be a finite number >= 0"):
        non_negative_number("x", bad)


def test_accepted_values_come_back_and_the_error_class_is_the_callers():
    assert positive_int("n", 3) == 3 and non_negative_int("n", 0) == 0
    assert positive_number("x", 2) == 2.0 and isinstance(positive_number("x", 2), float)
    assert non_negative_number("x", 0) == 0.0
    assert optional_seed("seed", None) is None and optional_seed("seed", 7) == 7

    class Custom(Exception):
        pass

    with pytest.raises(Custom, match="`seed` must be an int or None"):
        optional_seed("seed", True, Custom)
    with pytest.raises(Custom, match=r"got 0 \(why\)\."):
        positive_int("n", 0, Custom, hint=" (why)")
