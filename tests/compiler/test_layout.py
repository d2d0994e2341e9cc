"""channels_last between lowered convs: same values as the fake-quant reference, contiguous where layout matters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitmix.compiler.capture import capture
from bitmix.compiler.fold import prepare
from bitmix.compiler.layout import max_pool2d
from bitmix.compiler.lower import KernelLayer, lower
from bitmix.compiler.quantize import fake_quantize


class _Net(nn.Module):
    """Stem, max-pool, a residual block with a depthwise conv, average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.back = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 3, 2, 1)
        y = self.back(F.relu6(self.dw(F.relu(self.pw(x)))))
        x = F.relu(x + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_channels_last_between_convs_is_bit_exact() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 33, 30)
    graph = capture(model, (x,), "layout-net")
    assignment = {name: ("8/8", "4/8", "4/4", "2/8", "8/8")[i % 5] for i, name in enumerate(graph.names)}
    fq = fake_quantize(prepare(graph), assignment, (torch.randn(8, 3, 33, 30),))
    lowered = lower(fq).module
    convs = [m for m in lowered.modules() if isinstance(m, KernelLayer) and m.kind == "conv2d"]
    assert len(convs) == 4 and all(m.channels_last for m in convs)
    copies = [n for n in lowered.graph.nodes if n.target == "contiguous"]
    # the block's output reaches average pooling (a reduction: order-dependent in float)
    assert copies and any("adaptive_avg_pool2d" in str(u.target) for n in copies for u in n.users)
    seen = {}
    handle = convs[1].register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    with torch.no_grad():
        ref, out = fq(x), lowered(x)
    handle.remove()
    assert seen["out"].is_contiguous(memory_format=torch.channels_last) and not seen["out"].is_contiguous()
    assert torch.equal(ref, out)


def test_adds_and_relus_after_convs_fold_into_their_epilogues() -> None:
    """relu(stem), relu(pw), relu6(dw) and relu(x + back(..)) leave the graph; the lowered model's
    output stays bit-identical (``test_channels_last_between_convs_is_bit_exact``); a conv whose
    output has two users keeps its separate ops."""
    torch.manual_seed(1)
    model = _Net().eval()
    x = torch.randn(1, 3, 20, 18)
    graph = capture(model, (x,), "fuse-net")
    fq = fake_quantize(prepare(graph), dict.fromkeys(graph.names, "4/8"), (torch.randn(4, 3, 20, 18),))
    lowered = lower(fq).module
    ops = [getattr(n.target, "__name__", str(n.target)) for n in lowered.graph.nodes if n.op == "call_function"]
    assert not [o for o in ops if o.split(".")[0] in {"relu", "relu6", "hardtanh", "add"}], ops
    convs = {m.name: m for m in lowered.modules() if isinstance(m, KernelLayer) and m.kind == "conv2d"}
    assert sorted(m.clamp for m in convs.values()) == [(0.0, 6.0)] + [(0.0, float("inf"))] * 3
    residual = [n for n in lowered.graph.nodes if n.op == "call_module" and "residual" in n.kwargs]
    assert len(residual) == 1
    with torch.no_grad():
        assert torch.equal(fq(x), lowered(x))


class _ResidualMlp(nn.Module):
    """Two transformer-style residual blocks (``h + fc2(relu(fc1(h)))``) and a head whose output is used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(24, 48), nn.Linear(48, 24)
        self.fc3, self.fc4 = nn.Linear(24, 40), nn.Linear(40, 24)
        self.head = nn.Linear(24, 24)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.fc2(F.relu(self.fc1(h)))
        h = self.fc4(F.gelu(self.fc3(h))) + h
        y = self.head(h)
        return y + h + y


@pytest.mark.parametrize("path", ["avx512vnni", "avx2", "portable"])
@pytest.mark.parametrize("shape", [(1, 2, 24), (1, 16, 24), (3, 24)])
def test_adds_after_linears_fold_into_their_kernels(path: str, shape: tuple) -> None:
    """``h + fc(..)`` and ``fc(..) + h`` become the linear's residual (2 here); ``head``, whose value has two users,
    keeps its add; values bit-identical to the fake-quant reference (GEMV and fused shapes)."""
    from bitmix import kernels

    if path not in kernels.available_paths():
        pytest.skip(f"CPU cannot run the {path} path")
    torch.manual_seed(2)
    model = _ResidualMlp().eval()
    x = torch.randn(shape)
    graph = capture(model, (x,), "residual-mlp")
    fq = fake_quantize(prepare(graph), dict.fromkeys(graph.names, "4/8"), (torch.randn(8, *shape[1:]),))
    lowered = lower(fq).module
    fused = sorted(str(n.target) for n in lowered.graph.nodes if n.op == "call_module" and "residual" in n.kwargs)
    assert [t.split("_")[-1] for t in fused] == ["fc2", "fc4"], fused
    with torch.no_grad(), kernels.dispatch.use(path):
        assert torch.equal(fq(x), lowered(x))


def _chain_lowered(net: type[nn.Module], shape: tuple, bits: str, path: str, seed: int) -> tuple:
    """(an input, fake-quant reference, lowered module, its convs by short name) of a ``net`` at ``bits``
    everywhere, calibrated on 8 random inputs of ``shape``; skips a path this CPU cannot run."""
    from bitmix import kernels

    if path not in kernels.available_paths():
        pytest.skip(f"CPU cannot run the {path} path")
    torch.manual_seed(seed)
    model = net().eval()
    x = torch.randn(shape)
    graph = capture(model, (x,), f"{net.__name__.lower()}-net")
    fq = fake_quantize(prepare(graph), dict.fromkeys(graph.names, bits), (torch.randn(8, *shape[1:]),))
    lowered = lower(fq).module
    convs = {m.name.split(".")[-1]: m for m in lowered.modules() if isinstance(m, KernelLayer) and m.kind == "conv2d"}
    return x, fq, lowered, convs


def _input_types(x: torch.Tensor, fq: nn.Module, lowered: nn.Module, convs: dict, names: tuple, path: str
                 ) -> dict[str, list[type]]:
    """The type of each named conv's input over three calls of ``lowered`` on ``path`` (floats or codes), after
    checking those calls and the portable layers' (``cm.save``'s) equal the fake-quant reference."""
    from bitmix import kernels
    from bitmix.compiler.portable import portable

    inputs: dict[str, list[type]] = {n: [] for n in names}
    hooks = [convs[n].register_forward_pre_hook(lambda m, args, n=n: inputs[n].append(type(args[0])))
             for n in inputs]
    with torch.no_grad(), kernels.dispatch.use(path):
        ref = fq(x)
        outs = [lowered(x), lowered(x), lowered(x), portable(lowered)(x)]
    for h in hooks:
        h.remove()
    assert all(torch.equal(ref, out) for out in outs)
    return inputs


@pytest.mark.parametrize("path", ["avx512vnni", "avx2", "portable"])
@pytest.mark.parametrize("bits", ["4/8", "4/4"])
def test_depthwise_hands_the_next_conv_its_input_codes(path: str, bits: str) -> None:
    """``layout.code_chains``: pw -> dw -> back (MobileNet's expansion, depthwise, projection) pass codes
    from the second call at a shape on (the first checks the layers): dw -> back wherever the next conv
    runs the implicit GEMM, pw -> dw from the GEMM's epilogue (VNNI, AVX2); outputs stay bit-identical to the
    fake-quant reference on every path, and the portable layers ``cm.save`` exports (floats throughout)
    give the same values."""
    from bitmix.kernels.padded import PaddedCodes

    x, fq, lowered, convs = _chain_lowered(_Net, (2, 3, 33, 30), bits, path, 3)
    assert convs["pw"].codes_for is convs["dw"].plan and convs["dw"].codes_for is convs["back"].plan
    assert convs["stem"].codes_for is None and convs["back"].codes_for is None
    inputs = _input_types(x, fq, lowered, convs, ("dw", "back"), path)
    assert inputs["back"][0] is inputs["dw"][0] is torch.Tensor
    assert inputs["back"][1:3] == [torch.Tensor if path == "portable" else PaddedCodes] * 2
    assert inputs["dw"][1:3] == [torch.Tensor if path == "portable" else PaddedCodes] * 2


class _Bottleneck(nn.Module):
    """A ResNet bottleneck: 1x1 -> 3x3 (stride 2) -> 1x1 chained alone, a residual on the last."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(12, 20, 1)
        self.b = nn.Conv2d(20, 22, 3, 2, 1)
        self.c = nn.Conv2d(22, 12, 1)
        self.down = nn.Conv2d(12, 12, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return F.relu(y + self.down(x))


@pytest.mark.parametrize("path", ["avx512vnni", "avx2", "portable"])
@pytest.mark.parametrize("bits", ["4/8", "4/4", "2/4"])
def test_one_group_convs_hand_the_next_conv_its_input_codes(path: str, bits: str) -> None:
    """``layout.code_chains`` on one-group convs: a -> b -> c pass codes on VNNI and AVX2 (b gets codes and
    makes them for c), floats on the portable path; outputs bit-identical to the fake-quant reference on every path."""
    from bitmix import kernels
    from bitmix.kernels.padded import PaddedCodes

    x, fq, lowered, convs = _chain_lowered(_Bottleneck, (2, 12, 15, 14), bits, path, 4)
    assert convs["a"].codes_for is convs["b"].plan and convs["b"].codes_for is convs["c"].plan
    assert convs["c"].codes_for is None and convs["down"].codes_for is None
    inputs: list[type] = []
    hooks = [convs[n].register_forward_pre_hook(lambda m, args: inputs.append(type(args[0]))) for n in "bc"]
    with torch.no_grad(), kernels.dispatch.use(path):
        ref = fq(x)
        outs = [lowered(x), lowered(x), lowered(x)]
    for h in hooks:
        h.remove()
    assert all(torch.equal(ref, out) for out in outs)
    chained = torch.Tensor if path == "portable" else PaddedCodes
    assert inputs[:2] == [torch.Tensor, torch.Tensor] and inputs[-2:] == [chained, chained]


class _Residuals(nn.Module):
    """A stem, a ResNet basic block (its input is also its shortcut) and one with a downsample (its input feeds two
    convs), at 64 channels so stride-1 convs can run on the AMX engine."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, 1, 1)
        self.a1, self.a2 = nn.Conv2d(64, 64, 3, 1, 1), nn.Conv2d(64, 64, 3, 1, 1)
        self.b1, self.b2 = nn.Conv2d(64, 128, 3, 2, 1), nn.Conv2d(128, 128, 3, 1, 1)
        self.down = nn.Conv2d(64, 128, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.a2(F.relu(self.a1(x))) + x)
        x = F.relu(self.b2(F.relu(self.b1(x))) + self.down(x))
        return x.mean((2, 3))


@pytest.mark.parametrize("path", ["avx512amx", "avx512vnni", "avx2", "portable"])
def test_a_residual_stream_keeps_its_floats_and_hands_the_next_conv_codes(path: str) -> None:
    """``layout.code_chains`` where a conv's result is read by the next conv and by other ops (the shortcut's add,
    a downsample conv): it returns ``(floats, codes)`` (``floats_too``), and on VNNI and AMX one epilogue stores both,
    so a1 and b1 get codes from a shape's second call on (AVX2 and portable: floats); bit-identical to the fake-quant
    reference on every path, and the portable layers ``cm.save`` exports return the same pair."""
    from bitmix.kernels.padded import PaddedCodes

    x, fq, lowered, convs = _chain_lowered(_Residuals, (2, 3, 16, 16), "4/4", path, 5)
    assert convs["stem"].floats_too and convs["a2"].floats_too
    assert convs["stem"].codes_for is convs["a1"].plan and convs["a2"].codes_for is convs["b1"].plan
    assert not any(convs[n].floats_too for n in ("a1", "b1", "b2", "down"))
    inputs = _input_types(x, fq, lowered, convs, ("a1", "b1", "down"), path)
    handed = PaddedCodes if path in ("avx512amx", "avx512vnni") else torch.Tensor
    assert inputs["a1"][:3] == inputs["b1"][:3] == [torch.Tensor, handed, handed]
    assert inputs["down"] == [torch.Tensor] * 3


class _NaNStream(nn.Module):
    """c2's result (its residual ``sin(x)``: NaN where ``x`` is infinite) feeds c3 and an add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 3, 1, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.c2(F.relu(self.c1(x))) + torch.sin(x)
        return self.c3(s) * 2.0 + s


@pytest.mark.parametrize("path", ["avx512amx", "avx512vnni", "avx2"])
def test_a_nan_in_a_residual_stream_is_reported_by_the_conv_it_reaches(path: str) -> None:
    """A NaN the fused residual brings into c2's floats is caught as without the hand-off: c3's input error, not a
    code made of NaN, once the hand-off runs (from the second call)."""
    from bitmix import kernels
    from bitmix.errors import BitmixError

    x, fq, lowered, convs = _chain_lowered(_NaNStream, (1, 4, 9, 8), "4/8", path, 6)
    assert convs["c2"].floats_too and convs["c2"].codes_for is convs["c3"].plan
    bad = x.clone()
    bad[0, 1, 2, 3] = float("inf")  # c1 clips it; sin(inf) is NaN
    with torch.no_grad(), kernels.dispatch.use(path):
        for _ in range(3):
            assert torch.equal(lowered(x), fq(x))
            with pytest.raises(BitmixError, match="the input of layer 'c3'.* contains NaN"):
                lowered(bad)


def test_only_ops_that_leave_their_inputs_alone_share_a_conv_result() -> None:
    """``layout._reads_only``: in-place ops (``add_``, ``relu_``, an ``out=``) could change the floats after their
    codes were made; they keep the conv on floats alone."""
    from bitmix.compiler.layout import _reads_only

    class _M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x + 1
            b = torch.relu(x)
            x.add_(1)
            torch.relu_(b)
            return torch.add(a, b, out=a).clone()

    nodes = [n for n in torch.fx.symbolic_trace(_M()).graph.nodes if n.op != "placeholder"]
    # x + 1, relu(x), x.add_(1), relu_(b), add(a, b, out=a), .clone(), output
    assert [_reads_only(n, {}) for n in nodes] == [True, True, False, False, False, True, True]


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, 1, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return F.relu(y) + self.b(y)  # ``a``'s output has two users: nothing folds into ``a``


def test_a_conv_with_two_users_keeps_its_ops() -> None:
    torch.manual_seed(2)
    x = torch.randn(1, 4, 6, 6)
    graph = capture(_Shared().eval(), (x,), "shared-net")
    fq = fake_quantize(prepare(graph), dict.fromkeys(graph.names, "8/8"), (torch.randn(4, 4, 6, 6),))
    lowered = lower(fq).module
    convs = {m.name: m for m in lowered.modules() if isinstance(m, KernelLayer)}
    assert [m.clamp for m in convs.values()] == [None, None]
    with torch.no_grad():
        assert torch.equal(fq(x), lowered(x))


@pytest.mark.parametrize("args", [(3, 2, 1), (2, 2, 0), ((3, 2), (1, 2), (1, 0), (2, 1))], ids=str)
def test_nhwc_max_pool_equals_torch(args: tuple) -> None:
    """The lowered graphs' ``max_pool2d`` on channels_last floats == torch's, NaN and -0.0 included;
    other inputs go to torch's own."""
    torch.manual_seed(3)
    x = torch.randn(2, 5, 9, 8)
    x[0, 1, 2, 3] = float("nan")
    x[1, :, :4] = 0.0
    x[1, :, 4:6] = -0.0
    want = F.max_pool2d(x, *args)
    got = max_pool2d(x.contiguous(memory_format=torch.channels_last), *args)
    assert got.is_contiguous(memory_format=torch.channels_last)
    for out in (got, max_pool2d(x, *args)):  # channels_last: the kernel; NCHW: torch's own
        assert torch.equal(out.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(out).view(torch.int32), torch.nan_to_num(want).view(torch.int32))  # -0.0


@pytest.mark.parametrize("path", ["avx512vnni", "avx2"])
def test_code_hand_offs_share_one_buffer_across_batch_sizes(path: str) -> None:
    """Served at many batch sizes, a -> b -> c keep one input-code buffer per consumer conv, sized for the
    largest batch (one per shape held the sum of every batch ever served: a CNN served at batches 1..64 held
    585 MiB against 37 MiB at 64 alone), and stay bit-exact at each batch."""
    from bitmix import kernels
    from bitmix.compiler.lower import _PREPARED
    from bitmix.kernels import conv_nhwc

    x, fq, lowered, convs = _chain_lowered(_Bottleneck, (8, 12, 15, 14), "4/8", path, 4)
    with torch.no_grad(), kernels.dispatch.use(path):
        for _ in range(3):  # the hand-off starts at a shape's second call
            lowered(x)
        consumers = [_PREPARED[convs[name].plan] for name in "bc"]
        sizes = [conv_nhwc._INPUT_CODES[c].a8.nbytes for c in consumers]
        for batch in (1, 2, 3, 4, 5, 6, 7, 8):
            for _ in range(3):
                assert torch.equal(lowered(x[:batch]), fq(x[:batch]))
    assert [conv_nhwc._INPUT_CODES[c].a8.nbytes for c in consumers] == sizes
    assert sum(_PREPARED[conv.plan] in conv_nhwc._INPUT_CODES for conv in convs.values()) == 2  # b's and c's inputs


@pytest.mark.parametrize("path", ["avx2", "portable"])
def test_lowered_convs_bind_their_calls_per_shape_and_copies_rebind(path: str, monkeypatch) -> None:
    """Each lowered conv keeps its kernel constants (``KernelLayer._bound``) and each call signature's route
    (``PreparedConv.run``): after warm-up at two alternating batch sizes no call looks a plan's prepared conv up
    again, every output stays bit-identical to the fake-quant reference, and a deep copy or a pickle of the
    lowered module carries none of that process-local state (the copy binds its own plans)."""
    import copy
    import pickle

    from bitmix import kernels
    from bitmix.compiler import lower as lower_mod

    x, fq, lowered, convs = _chain_lowered(_Net, (2, 3, 33, 30), "4/8", path, 3)
    with torch.no_grad(), kernels.dispatch.use(path):
        refs = [fq(x[:1]), fq(x)]
        for _ in range(3):
            for i, batch in enumerate((1, 2)):
                assert torch.equal(lowered(x[:batch]), refs[i])
        with monkeypatch.context() as patch:
            patch.setattr(lower_mod, "_prepared", lambda p: pytest.fail("a bound layer looked its plan up"))
            for batch in (1, 2, 1):
                assert torch.equal(lowered(x[:batch]), refs[batch - 1])
        twin = copy.deepcopy(lowered)
        twin_convs = [m for m in twin.modules() if isinstance(m, KernelLayer) and m.kind == "conv2d"]
        assert all("_bound" not in m.__dict__ for m in twin_convs)
        assert torch.equal(twin(x), refs[1])
        assert all(m.__dict__["_bound"][0] is m.plan for m in twin_convs)
        assert "_bound" not in pickle.loads(pickle.dumps(convs["dw"])).__dict__
