import numpy as np
import pytest

from bitmix.simulator.config import ChipConfig
from bitmix.simulator.mapping import cores_of, gemm_view, layer_works, map_layer, tiles, weight_bytes

from .conftest import conv, linear


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2", "bert-base"])
def test_gemm_view_preserves_macs(zoo_graph, name):
    for layer in zoo_graph(name).layers:
        assert gemm_view(layer).macs == layer.macs, layer.name


def test_mapping_fits_the_array_and_covers_the_work():
    chip = ChipConfig()
    for layer in (conv("c", 64, 64, 56), conv("dw", 96, 96, 56, groups=96), linear("l", 768, 3072)):
        work = layer_works([layer])[0]
        for bits in (8, 4, 2):
            m = map_layer(work, bits, chip)
            assert m.cores_used <= chip.cores
            cores = cores_of(work, m, chip)
            assert len(set(zip(cores.x.tolist(), cores.y.tolist(), strict=True))) == m.cores_used
            # every MAC is done by exactly one core: per-core tiles multiply back to the layer
            gm = work.gemm
            g, p = tiles(gm.groups, m.s_g)[cores.gi], tiles(gm.rows, m.s_p)[cores.pi]
            k, n = tiles(gm.red, m.s_k)[cores.ki], tiles(gm.cols, m.s_n)[cores.ni]
            assert int(np.sum(g * p * k * n)) == gm.macs


def test_partial_sum_chains_are_neighbours():
    work = layer_works([linear("l", 4096, 64, rows=1)])[0]
    m = map_layer(work, 8, ChipConfig())
    assert m.s_k > 1  # one row, few outputs: the mapper must split the reduction
    cores = cores_of(work, m, ChipConfig())
    steps = np.abs(np.diff(cores.x)) + np.abs(np.diff(cores.y))
    assert np.all(steps[cores.ki[1:] > 0] == 1)


def test_weight_bytes_pack_by_precision():
    layer = linear("l", 768, 768)
    assert weight_bytes(layer, 8) == 768 * 768
    assert weight_bytes(layer, 4) == 768 * 768 // 2
    assert weight_bytes(layer, 2) == 768 * 768 // 4


def test_depthwise_packs_groups():
    work = layer_works([conv("dw", 96, 96, 56, groups=96)])[0]
    m = map_layer(work, 8, ChipConfig())
    assert m.pack > 1 or m.g_c == 1
