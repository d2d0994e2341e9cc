import pytest
import torch

from bitmix.compiler.capture import capture
from bitmix.errors import BitmixError
from bitmix.simulator import ChipConfig, simulate, simulate_calls, uniform
from bitmix.simulator.config import config_from_dict

from .conftest import linear, llm_stack


def test_3b_stack_at_4_bits_pipelines_over_chips():
    layers = llm_stack()
    assert sum(layer.params for layer in layers) == pytest.approx(3.0e9, rel=0.01)
    r = simulate_calls(layers, uniform(layers, 4), model="llm-3b")
    weights = 3.0e9 / 2
    assert weights / ChipConfig().sram_bytes <= r.chips <= 2 * weights / ChipConfig().sram_bytes
    assert len(r.stages) == r.chips and r.stages[-1].transfer_bytes == 0
    assert all(s.weight_bytes <= s.capacity_bytes for s in r.stages)
    assert all(s.transfer_bytes > 0 and s.transfer_s > 0 for s in r.stages[:-1])
    assert r.latency_s > r.pipeline_period_s
    assert r.energy_breakdown_j["pcie"] > 0
    r8 = simulate_calls(layers, uniform(layers, 8))
    assert r8.chips > r.chips


def test_bert_base_at_8_bits(zoo_graph):
    graph = zoo_graph("bert-base")
    r = simulate(graph, uniform(graph, 8))
    assert r.chips == 1  # 85.6 M linear weights = 86 MB < 192 MiB of core SRAM
    small = ChipConfig(core_sram_bytes=256 * 1024)  # a 64 MiB chip must split it
    r_small = simulate(graph, uniform(graph, 8), small)
    assert r_small.chips == 2
    assert r_small.stages[0].transfer_bytes > 0


def test_layer_too_big_for_one_chip():
    huge = linear("huge", 16384, 16384)  # 256 MiB at 8 bits
    with pytest.raises(BitmixError, match="layer 'huge' needs 256.0 MiB") as err:
        simulate_calls([huge], {"huge": 8})
    assert "\n" not in str(err.value)
    assert simulate_calls([huge], {"huge": 4}).chips == 1


class _SkipBlock(torch.nn.Module):
    """a -> b -> c, plus a's output added after c (a residual skip), then d."""

    def __init__(self, d: int = 256, f: int = 1024) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(d, d), torch.nn.Linear(d, f), torch.nn.Linear(f, d),
                                          torch.nn.Linear(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.d(self.c(torch.tanh(self.b(h))) + h)


def test_a_chip_runs_its_layers_as_a_chip_of_their_own():
    """A stage's first layer reads the frame buffer and its last overlaps its own first layer's prefetch,
    not the next chip's (which made the period too short: 2.27 instead of 2.75 us on this chain)."""
    chip = config_from_dict({"chip": {"cores_x": 4, "cores_y": 4, "core_sram_bytes": 28000}})
    dims = [512, 256, 600, 600, 16, 256]
    layers = [linear(f"l{i}", dims[i], dims[i + 1], rows=64) for i in range(5)]
    bits = {"l0": 2, "l1": 8, "l2": 4, "l3": 4, "l4": 8}
    for engine in ("analytic", "cycle"):
        r = simulate_calls(layers, bits, config=chip, engine=engine)
        assert r.chips >= 2
        for stage in r.stages:
            names = [lr.name for lr in r.layers if lr.chip == stage.chip]
            alone = simulate_calls([lay for lay in layers if lay.name in names], bits, config=chip, engine=engine)
            assert alone.chips == 1
            assert stage.latency_s == pytest.approx(alone.latency_s, rel=1e-12)
        assert r.pipeline_period_s == pytest.approx(max(max(s.latency_s, s.transfer_s) for s in r.stages))


def test_a_skip_tensor_crossing_a_chip_boundary_is_charged():
    graph = capture(_SkipBlock(), (torch.randn(8, 256),), "skip")
    assert {layer.name: layer.crossing for layer in graph.layers} == {"a": 0, "b": 0, "c": 8 * 256, "d": 0}
    chip = config_from_dict({"chip": {"cores_x": 2, "cores_y": 2, "core_sram_bytes": 90000}})
    r = simulate(graph, uniform(graph, 8), chip)
    assert [(s.first_layer, s.last_layer) for s in r.stages] == [("a", "b"), ("c", "d")]
    assert r.stages[0].transfer_bytes == 8 * 1024 + 8 * 256  # b's output and a's, which the add after c reads


def test_the_compiled_models_price_of_a_larger_batch_carries_its_skip_tensors(tmp_path):
    """`cm.simulate()` after a run at another batch charges the skip tensor at that batch, as a capture there."""
    import bitmix

    config = tmp_path / "chip.toml"
    config.write_text("[chip]\ncores_x = 2\ncores_y = 2\ncore_sram_bytes = 90000\n")
    torch.manual_seed(0)
    model = _SkipBlock().eval()
    target = bitmix.targets["int8-npu"].with_chip_config(str(config))
    cm = bitmix.compile(model, (torch.randn(8, 256),), target, data=torch.randn(32, 256),
                        options=bitmix.CompileOptions(frontier_points=0))
    larger = torch.randn(24, 256)
    cm(larger)
    ran = cm.simulate()
    chip = config_from_dict({"chip": {"cores_x": 2, "cores_y": 2, "core_sram_bytes": 90000}})
    captured = simulate(capture(model, (larger,)), uniform(capture(model, (larger,)), 8), chip)
    assert ran.chips == captured.chips > 1
    assert [s.transfer_bytes for s in ran.stages] == [s.transfer_bytes for s in captured.stages]
    assert 24 * (1024 + 256) in [s.transfer_bytes for s in ran.stages]  # b's output and the skip, a's
    assert ran.latency_s == pytest.approx(captured.latency_s, rel=1e-12)
