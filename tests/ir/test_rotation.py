"""The online-rotation rule: which layers at which precision, and what it costs per input element."""

from bitmix.ir.precision import Precision
from bitmix.ir.rotation import rotation_block, rotation_ops_per_element


def test_linears_at_narrow_activations_rotate_over_the_largest_power_of_two_block():
    assert rotation_block("linear", 384, Precision(4, 4)) == 128
    assert rotation_block("linear", 1536, Precision(2, 2)) == 512
    assert rotation_block("linear", 1536, Precision(2, 4)) == 512
    assert rotation_block("linear", 64, Precision(4, 4)) == 64


def test_no_rotation_at_8_bit_activations_for_convs_or_without_a_block():
    assert rotation_block("linear", 384, Precision(4, 8)) is None
    assert rotation_block("linear", 384, Precision(8, 8)) is None
    assert rotation_block("conv2d", 384, Precision(4, 4)) is None
    assert rotation_block("linear", 8 * 3, Precision(4, 4)) is None  # block 8 < MIN_BLOCK
    assert rotation_block("linear", 17, Precision(4, 4)) is None
    assert rotation_block("linear", 384, Precision(4, 4), input_nonneg=True) is None  # keeps its unsigned range


def test_a_rotated_8_bit_pair_rotates_where_a_narrow_activation_would():
    assert rotation_block("linear", 384, Precision(4, 8, True)) == 128
    assert rotation_block("linear", 1536, Precision(2, 8, True)) == 512
    assert rotation_block("linear", 384, Precision(8, 8, True)) == 128
    assert rotation_block("conv2d", 384, Precision(4, 8, True)) is None
    assert rotation_block("linear", 384, Precision(4, 8, True), input_nonneg=True) is None
    assert rotation_block("linear", 17, Precision(4, 8, True)) is None


def test_ops_per_element_are_the_sign_flip_and_the_butterflies():
    assert rotation_ops_per_element(128) == 1 + 7
    assert rotation_ops_per_element(16) == 1 + 4
