import numpy as np
import pytest

from bitmix.kernels.limits import MAX_K_PAD, max_weight_k
from bitmix.kernels.pack import SUPPORTED_BITS, pack_weights


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_max_weight_k_is_the_longest_row_every_width_packs_within_the_limit(bits):
    assert pack_weights(np.zeros((1, max_weight_k()), dtype=np.int8), bits).k_pad <= MAX_K_PAD
    longer = [pack_weights(np.zeros((1, max_weight_k() + 1), dtype=np.int8), b).k_pad for b in SUPPORTED_BITS]
    assert max(longer) > MAX_K_PAD
