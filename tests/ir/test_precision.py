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
    assert [str(p) for p in get_target("mixed-npu").choices] == ["8/8", "4/8", "2/8", "4/4", "2/4", "2/2"]
    assert TARGETS["int8-npu"].choices == (8,)


def test_target_with_pair_the_chip_does_not_run():
    with pytest.raises(BitmixError, match="weights wider than activations"):
        Target("t", ("8/4",))  # type: ignore[arg-type]
