"""ResNet-50 int8 on the default chip vs NorthPole's published figures (Science 2023, Table 1).

No per-model constant: the chip config is fixed; the one fitted constant (static power)
is set once in config.py with its arithmetic.
"""

import pytest

from bitmix.simulator import simulate, uniform

NORTHPOLE_RESNET50_FPS = 42_460
NORTHPOLE_RESNET50_FPS_PER_W = 571


@pytest.mark.parametrize("engine", ["analytic", "cycle"])
def test_resnet50_int8_matches_northpole(zoo_graph, engine):
    graph = zoo_graph("resnet50")
    r = simulate(graph, uniform(graph, 8), engine=engine)
    assert r.chips == 1
    assert r.throughput_fps == pytest.approx(NORTHPOLE_RESNET50_FPS, rel=0.20)
    assert r.fps_per_w == pytest.approx(NORTHPOLE_RESNET50_FPS_PER_W, rel=0.20)


def test_resnet50_precision_scaling(zoo_graph):
    graph = zoo_graph("resnet50")
    fps = {b: simulate(graph, uniform(graph, b)).throughput_fps for b in (8, 4, 2)}
    assert 1.0 < fps[4] / fps[8] <= 2.0 and 1.0 < fps[2] / fps[4] <= 2.0
