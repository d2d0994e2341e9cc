"""The fidelity guard: cosine and max relative error to FP32 in the report, one warning when lost."""

import warnings

import pytest
import torch
from torch import nn

import bitmix
from bitmix.compiler.fidelity import MIN_COSINE, fidelity, guard


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_fidelity_numbers_against_plain_torch():
    x = torch.randn(8, 4)
    noisy = x + 0.5 * torch.ones_like(x)
    got = fidelity(lambda t: t, lambda t: noisy, (x,))
    cos = torch.nn.functional.cosine_similarity(noisy.double(), x.double(), dim=1).mean()
    assert got["example_cosine"] == pytest.approx(float(cos))
    assert got["example_max_rel_err"] == pytest.approx(0.5 / float(x.abs().max()))


def test_each_output_is_judged_and_the_worst_is_reported():
    x = torch.randn(8, 16)
    bad = x + torch.randn(8, 16)
    got = fidelity(lambda t: (t, t.softmax(-1)), lambda t: (bad, t.softmax(-1)), (x,))
    cos = torch.nn.functional.cosine_similarity(bad.double(), x.double(), dim=1).mean()
    assert got["example_cosine"] == pytest.approx(float(cos))  # the good second output does not lift it


def test_one_value_per_example_is_one_vector_and_a_scalar_only_an_error():
    x = torch.randn(8, 1)
    flipped = fidelity(lambda t: t.squeeze(1), lambda t: -t.squeeze(1), (x,))
    assert flipped["example_cosine"] == pytest.approx(-1.0)  # per example this would be a sign test only
    scaled = fidelity(lambda t: t.mean(), lambda t: 7 * t.mean(), (x,))
    assert scaled["example_cosine"] == 1.0 and scaled["example_max_rel_err"] == pytest.approx(6.0)
    nan = fidelity(lambda t: (t, t), lambda t: (t, t * float("nan")), (x.expand(8, 4),))
    assert nan["example_cosine"] != nan["example_cosine"]


def test_rows_that_are_zero_in_both_match_and_a_nan_output_is_an_error():
    """Padding rows (a mask times the output) are exactly zero in FP32 and compiled: a perfect match, not the
    cosine 0 ``cosine_similarity`` gives two zero vectors; a row zero in one only is a mismatch."""
    x = torch.randn(8, 4)
    mask = (torch.arange(8) % 2 == 0).unsqueeze(1)
    assert fidelity(lambda t: t * mask, lambda t: t * mask, (x,))["example_cosine"] == pytest.approx(1.0)
    assert fidelity(lambda t: t * mask, lambda t: t, (x,))["example_cosine"] == pytest.approx(0.5)
    nan = fidelity(lambda t: t, lambda t: torch.where(mask, t, float("nan")), (x,))
    assert nan["example_max_rel_err"] != nan["example_max_rel_err"]  # max() dropped it: 0.0


def test_tiny_outputs_keep_their_cosine():
    """Outputs of norm ~1e-9: ``cosine_similarity``'s eps (1e-8 on each norm) made a near-exact match score ~0.5."""
    x = 1e-9 * torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    noisy = x * (1 + 0.01 * torch.randn(8, 10, generator=torch.Generator().manual_seed(1)))
    xd, nd = x.double(), noisy.double()
    true = float(((xd * nd).sum(1) / (xd.norm(dim=1) * nd.norm(dim=1))).mean())
    got = fidelity(lambda t: t, lambda t: noisy, (x,))["example_cosine"]
    assert got == pytest.approx(true, abs=1e-12) and got > 0.999
    assert fidelity(lambda t: t, lambda t: -t, (x,))["example_cosine"] == pytest.approx(-1.0)
    log: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        guard(lambda t: t, lambda t: noisy, (x,), log, fallback=(x,))
    assert log == []


def test_guard_warns_once_with_what_to_try():
    x = torch.randn(8, 4)
    log: list[str] = []
    with pytest.warns(UserWarning, match="mixed-npu or int8-npu") as record:
        guard(lambda t: t, lambda t: -t, None, log, fallback=(x,))  # no calibration data: the example
    assert len(record) == 1 and len(log) == 1
    assert "calibration data" in log[0] and "a higher budget" in log[0]


def test_guard_records_which_inputs_it_measured_and_the_warning_names_them():
    """The warning said "on the example inputs" while it measured the calibration inputs (which set the ranges)."""
    x, calib = torch.randn(8, 4), torch.randn(64, 4)
    log: list[str] = []
    with pytest.warns(UserWarning, match=r"far from FP32 on the 32 calibration inputs \(in-sample: they set the "):
        got = guard(lambda t: t, lambda t: -t, (calib,), log, fallback=(x,))
    assert (got["fidelity_inputs"], got["fidelity_examples"], got["fidelity_in_sample"]) == ("calibration", 32, True)
    with pytest.warns(UserWarning, match=r"on the 8 example inputs \(in-sample"):  # no data: they set the ranges
        got = guard(lambda t: t, lambda t: -t, None, log, fallback=(x,))
    assert (got["fidelity_inputs"], got["fidelity_examples"], got["fidelity_in_sample"]) == ("example", 8, True)


def test_guard_names_only_what_was_not_tried():
    x = torch.randn(8, 4)
    log: list[str] = []
    with pytest.warns(UserWarning):
        guard(lambda t: t, lambda t: -t, (x,), log, fallback=(x,), target="mixed-npu", finetuned=True)
    assert "int8-npu" in log[0] and "mixed-npu or" not in log[0]
    assert "calibration data" not in log[0] and "fine-tuning" not in log[0]
    with pytest.warns(UserWarning):
        guard(lambda t: t, lambda t: -t, (x,), log, fallback=(x,), target="int8-npu", full_budget=True,
              finetuned=True)
    assert "wider target" not in log[1] and "higher budget" not in log[1] and "8 bits cannot cover" in log[1]


def test_silent_at_int8_and_in_report():
    x = torch.randn(16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cm = bitmix.compile(_mlp(), x, target="int8-npu", budget=1.0, data=x,
                            options=bitmix.CompileOptions(frontier_points=0))
    acc = cm.report.to_dict()["accuracy"]
    assert acc["example_cosine"] >= MIN_COSINE
    assert 0 < acc["example_max_rel_err"] < 0.25
    assert "fidelity to FP32 on the 16 calibration inputs (in-sample: they set the activation ranges): cosine" in (
        "\n".join(_summary(cm.report)))


def test_fires_on_a_broken_quantization():
    """Inputs 50x larger than the data-free activation steps assume: almost every activation clips."""
    x = 50 * torch.randn(16, 32)
    with pytest.warns(UserWarning, match="far from FP32") as record:
        cm = bitmix.compile(_mlp(), x, target="int4-npu", budget=1.0, options=bitmix.CompileOptions(frontier_points=0))
    assert sum("far from FP32" in str(w.message) for w in record) == 1
    assert cm.report.accuracy["example_cosine"] < MIN_COSINE
    assert any("far from FP32" in w for w in cm.report.warnings)


def test_static_export_checks_on_the_example_when_calibration_has_other_shapes():
    x, calib = torch.randn(4, 32), torch.randn(64, 32)
    cm = bitmix.compile(_mlp(), x, target="int8-npu", budget=1.0, data=calib,
                        options=bitmix.CompileOptions(frontier_points=0, dynamic_shapes=None))
    assert cm.report.accuracy["example_cosine"] >= MIN_COSINE
    assert any("fidelity to FP32 on the 4 example inputs: cosine" in line for line in _summary(cm.report))


def _summary(report) -> list[str]:
    from bitmix.report.terminal import summary_lines

    return summary_lines(report)


def test_static_export_with_a_batch_above_the_sample_limit_is_checked_whole():
    """A static export takes only the example's batch (here > MAX_EXAMPLES): the guard runs it whole."""
    from bitmix.compiler.fidelity import MAX_EXAMPLES

    x = torch.randn(MAX_EXAMPLES + 8, 32)
    cm = bitmix.compile(_mlp(), x, target="int8-npu", budget=1.0, data=x,
                        options=bitmix.CompileOptions(frontier_points=0, dynamic_shapes=None))
    assert cm.report.accuracy["example_cosine"] >= MIN_COSINE
