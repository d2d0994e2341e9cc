"""Precision pairs: parsing, shorthand, ordering, and the targets built from them."""

import pytest

from bitmix.errors import BitmixError
from bitmix.ir.precision import Precision, as_precision
from bitmix.ir.targets import TARGETS, Target, get_target


def test_parse_and_print():
    assert as_precision(4) == Precision(4, 4) and as_precision("4/8") == Precision(4, 8)
    assert as_precision((2, 4)) == Precision(2, 4) and str(Precision(4, 8)) == "4/8"


def test_equal_pair_is_the_int():
    assert Precision(4, 4) == 4 and Precision(4, 8) != 4
    assert {4: "x"}[Precision(4, 4)] == "x" and {Precision(2, 2): "y"}[2] == "y"


def test_a_rotated_pair_is_its_own_choice():
    p = as_precision("4/8r")
    assert p == Precision(4, 8, True) and str(p) == "4/8r" and p.plain == Precision(4, 8)
    assert p != Precision(4, 8) and p != (4, 8) and Precision(4, 8) == (4, 8)
    assert Precision(8, 8, True) != 8 and as_precision(str(Precision(8, 8, True))) == Precision(8, 8, True)
    assert len({p, Precision(4, 8), (4, 8)}) == 2
    assert sorted([Precision(8, 8), p, Precision(4, 8)], reverse=True) == [Precision(8, 8), p, Precision(4, 8)]


@pytest.mark.parametrize("bad", ["4/4r", "2/2r", "2/4r", "8r", "4/8rr", "r"])
def test_rotation_is_offered_at_8_bit_activations_only(bad):
    with pytest.raises(BitmixError) as err:
        as_precision(bad)
    assert "\n" not in str(err.value)


def test_a_rotated_pair_built_directly_is_checked_at_the_boundary():
    with pytest.raises(BitmixError, match="8-bit activations only"):
        Target("t", (Precision(4, 4, True),))  # type: ignore[arg-type]


def test_order_highest_first_by_cost():
    pairs = [Precision(*p) for p in ((2, 2), (4, 4), (2, 8), (8, 8), (2, 4), (4, 8))]
    assert [str(p) for p in sorted(pairs, reverse=True)] == ["8/8", "4/8", "2/8", "4/4", "2/4", "2/2"]


@pytest.mark.parametrize("bad", ["4/3", "x", (4, 8, 2), 16, True, 4.0])
def test_bad_values_are_one_line_errors(bad):
    with pytest.raises(BitmixError) as err:
        as_precision(bad)
    assert "\n" not in str(err.value)


def test_targets():
    assert get_target("int4int2-npu").choices == (Precision(4, 4), Precision(2, 2))
    assert get_target("int4int2-npu").pin_first_last == Precision(8, 8)
    w4a8 = get_target("w4a8-npu")
    assert w4a8.choices == (Precision(4, 8), Precision(2, 8)) and w4a8.pin_first_last == Precision(8, 8)
    w4a8r = get_target("w4a8r-npu")
    assert [str(p) for p in w4a8r.choices] == ["4/8r", "2/8r"] and w4a8r.pin_first_last == Precision(8, 8)
    assert [str(p) for p in get_target("mixed-npu").choices] == ["8/8", "4/8", "2/8", "4/4", "2/4", "2/2"]
    assert TARGETS["int8-npu"].choices == (8,)


def test_target_with_pair_the_chip_does_not_run():
    with pytest.raises(BitmixError, match="weights wider than activations"):
        Target("t", ("8/4",))  # type: ignore[arg-type]
