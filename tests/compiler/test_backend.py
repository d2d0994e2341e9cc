"""torch.compile(model, backend="bitmix") on nets and zoo models."""

import warnings

import pytest
import torch
from torch import nn

import bitmix
from bitmix.errors import BitmixError
from tests.compiler.modules import CallCounter
from tests.conftest import zoo_entry


def _cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(out.flatten(1).double(), ref.flatten(1).double(), dim=1).mean())


def _conv_bn_linear() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    with torch.no_grad():  # non-trivial running statistics: folding them wrongly would show
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_batchnorm_buffers_go_back_into_the_module_and_the_model_runs_on_kernels():
    torch._dynamo.reset()
    model = _conv_bn_linear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 3, 8, 8)
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert not torch.equal(out, ref)  # quantized, not an eager fallback
    assert _cosine(out, ref) > 0.99
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_threads_calling_a_fresh_piece_at_once_compile_it_once(monkeypatch):
    """A serving pool's first requests arrive together: one thread compiles the piece, the others wait for it.
    Each used to compile its own copy (exported at once, calibrated each on other data), and an export running
    while Dynamo traced in another thread broke Dynamo, which then ran the model in eager FP32 (2 of 15 trials)."""
    import threading

    from bitmix.compiler import pipeline

    compiles, compile_once = [], pipeline.compile
    monkeypatch.setattr(pipeline, "compile", lambda *a, **k: compiles.append(1) or compile_once(*a, **k))
    xs = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) * (1 + i) for i in range(3)]
    for _ in range(6):
        torch._dynamo.reset()
        compiles.clear()
        model = _conv_bn_linear()
        compiled = torch.compile(model, backend="bitmix", dynamic=False)
        barrier, first, errors = threading.Barrier(3), {}, []

        def call(i: int, compiled=compiled, barrier=barrier, first=first, errors=errors) -> None:
            try:
                barrier.wait()
                with torch.no_grad():
                    first[i] = compiled(xs[i])
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(compiles) == 1
        with torch.no_grad():
            for i, x in enumerate(xs):
                later = compiled(x)
                assert torch.equal(later, first[i]) and not torch.equal(later, model(x))  # the kernels, not eager


def test_an_answer_does_not_depend_on_the_requests_served_before_it(monkeypatch):
    """Dynamo recompiles a piece on a new batch size and on a grad-mode change: those compiles calibrate on
    the piece's first call, as the first compile did, not on whichever request triggered them."""
    from bitmix.compiler import pipeline

    torch._dynamo.reset()
    compiles, compile_once = [], pipeline.compile
    monkeypatch.setattr(pipeline, "compile", lambda *a, **k: compiles.append(1) or compile_once(*a, **k))
    compiled = torch.compile(_conv_bn_linear(), backend="bitmix")
    g = torch.Generator().manual_seed(2)
    x4 = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        first = compiled(x4)
        compiled(torch.randn(8, 3, 8, 8, generator=g) * 3)  # another client's batch: a symbolic-batch recompile
        assert len(compiles) == 2 and torch.equal(compiled(x4), first)
    assert torch.equal(compiled(x4).detach(), first) and len(compiles) == 3  # grad mode on: one more compile


def test_an_answer_does_not_depend_on_an_earlier_batch_size_with_bias_correction():
    """Dynamo's first piece is static and its recompile for a new batch symbolic: both must quantize alike (the
    static one fitted bias correction on all its examples, the symbolic one on half: x's answer moved by 9e-3)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.RMSNorm(32), nn.GELU(), nn.Linear(32, 16)).eval()
    x, y = torch.randn(4, 6, 16), torch.randn(8, 6, 16)
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        first = compiled(x)
        compiled(y)
        assert torch.equal(compiled(x), first)


class _Branches(nn.Module):
    """A data-dependent `if`: two graph pieces over the same weights (and a glue piece with no layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(torch.relu(x))
        return self.fc(torch.relu(-x))


def test_each_branch_of_a_data_dependent_if_calibrates_on_its_own_first_call():
    import copy

    torch.manual_seed(0)
    model = _Branches().eval()
    twin = copy.deepcopy(model)
    small, large = torch.rand(8, 16) * 0.05, -torch.rand(8, 16) * 5
    with torch.no_grad():
        torch._dynamo.reset()
        alone = torch.compile(twin, backend="bitmix")(large)
        compiled = torch.compile(model, backend="bitmix")
        compiled(small)
        assert torch.equal(compiled(large), alone)  # not calibrated on the other branch's (small) inputs


def test_weights_changed_in_place_are_compiled_again_after_a_dynamo_reset():
    """The docstring's contract: new weights need `torch._dynamo.reset()`, after which they are what runs."""
    model = _conv_bn_linear()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch._dynamo.reset()
        before = torch.compile(model, backend="bitmix")(x)
        model[4].weight.mul_(-1)
        torch._dynamo.reset()
        after = torch.compile(model, backend="bitmix")(x)
    assert _cosine(after, model(x)) > 0.99 and not torch.equal(after, before)


def test_a_piece_given_a_size_it_cannot_read_runs_eagerly():
    """After a graph break the last piece gets the batch size as a symbolic input of its own; it runs eagerly."""

    class SizeOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
            h = torch.relu(self.a(x))
            return self.b(h) * h.mean().item(), x.shape[0]

    torch._dynamo.reset()
    compiled = torch.compile(SizeOut().eval(), backend="bitmix")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [compiled(torch.randn(b, 16))[1] for b in (8, 3)] == [8, 3]


def test_an_empty_request_gets_the_empty_answer():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    compiled = torch.compile(model, backend="bitmix", dynamic=True)
    with torch.no_grad():
        assert compiled(torch.randn(8, 16)).shape == (8, 8)
        assert compiled(torch.randn(0, 16)).shape == (0, 8)  # was a ZeroDivisionError in the allocator


def test_inputs_that_require_grad_are_warned_once_that_no_gradient_flows_back():
    """A compiled block inside a residual: backward() succeeded and silently missed every path through it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = torch.compile(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval(), backend="bitmix")
    h = torch.randn(8, 16, requires_grad=True)
    with pytest.warns(UserWarning, match="no gradient flows back through it"):
        block(h)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block(h)  # once per compiled model
        with torch.no_grad():
            block(h)
    cm = bitmix.compile(nn.Linear(16, 4).eval(), torch.randn(8, 16), options=bitmix.CompileOptions(frontier_points=0))
    with pytest.warns(UserWarning, match="no gradient flows back through it"):
        cm(h)


def test_a_graph_traced_in_training_mode_is_compiled_as_traced_with_a_warning():
    torch._dynamo.reset()
    model = _conv_bn_linear().train()
    x = torch.randn(16, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with pytest.warns(UserWarning, match=r"traced in training mode \(batch_norm on batch statistics\).*never "
                                         r"updates BatchNorm running statistics"):
        with torch.no_grad():
            out = torch.compile(model, backend="bitmix")(x)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # as the warning says
    with torch.no_grad():
        assert _cosine(out, model(x)) > 0.99  # batch statistics, as torch.compile would compute
    assert model.training


def test_the_fused_transformer_fast_path_is_named_and_the_switch_it_names_quantizes():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True))
    model.eval()
    x = torch.randn(1, 9, 16)
    with torch.no_grad():
        ref = model(x)
        with pytest.warns(UserWarning, match=r"fused transformer inference op \(_transformer_encoder_layer_fwd"):
            torch.compile(model, backend="bitmix")(x)  # stays FP32 inside, without crashing
        torch._dynamo.reset()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            out = torch.compile(model, backend="bitmix")(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert not torch.equal(out, ref) and _cosine(out, ref) > 0.99  # the encoder's linears on kernels now


def test_backend_matches_bitmix_compile_calibrated_on_the_first_call():
    """The backend calibrates on the first call's real tensors: same result as bitmix.compile(data=x)."""
    import bitmix

    torch._dynamo.reset()
    model = _conv_bn_linear()
    x = torch.randn(16, 3, 8, 8)
    cm = bitmix.compile(model, x, target="int8-npu", budget=1.0, data=x,
                        options=bitmix.CompileOptions(frontier_points=0))
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), cm(x), rtol=1e-4, atol=1e-4)


class _Normed(nn.Module):
    """Weight norm on a conv and a linear, spectral norm on another linear (parametrizations Dynamo inlines),
    and a linear whose weight depends on the input (no parameter: it must stay as traced)."""

    def __init__(self) -> None:
        super().__init__()
        from torch.nn.utils import parametrizations

        self.conv = parametrizations.weight_norm(nn.Conv2d(3, 8, 3))
        self.fc = parametrizations.weight_norm(nn.Linear(8 * 6 * 6, 16))
        self.sn = parametrizations.spectral_norm(nn.Linear(16, 16))
        self.gate = nn.Parameter(torch.randn(10, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.sn(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))
        return nn.functional.linear(h, self.gate * h.mean())  # a weight computed from the input


def test_weights_computed_from_parameters_are_quantized_as_bitmix_compile_does():
    """Dynamo inlines weight/spectral norm, so the backend saw computed weights: those layers stayed FP32 (with a
    warning), and a model whose every conv/linear is parametrized ran wholly in eager FP32 without one (this one
    did), unlike bitmix.compile, which bakes parametrizations. Computed once, they are quantized; a weight that
    depends on the input is not a layer and still runs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Normed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(16, 3, 8, 8)
    cm = bitmix.compile(model, x, target="int8-npu", budget=1.0, data=x,
                        options=bitmix.CompileOptions(frontier_points=0))
    assert {"conv", "fc", "sn"} <= set(cm.assignment)
    compiled = torch.compile(model, backend="bitmix")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out, ref = compiled(x), model(x)
    assert not [w for w in caught if "stay FP32" in str(w.message)]
    assert not torch.equal(out, ref)  # quantized, not an eager fallback
    with torch.no_grad():
        assert torch.equal(out, cm(x))
    assert _cosine(out, ref) > 0.99
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Heads(nn.Module):
    """Reshapes by its input's sizes, as attention does: Dynamo's first call bakes the batch into the views."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.out = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.proj(x).view(b, t, 4, 4).transpose(1, 2).reshape(b, t, 16)
        return self.out(torch.relu(h))


def test_a_piece_traced_at_a_fixed_batch_calibrates_on_that_batch_only():
    """A static first-call piece runs only its traced batch: bias correction and live rows must not split
    or chunk the calibration (they did: a 4-row half of an 8-row call failed inside the static views)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Heads().eval()
    x = torch.randn(20, 6, 16)
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert not torch.equal(out, ref)
    assert _cosine(out, ref) > 0.999


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_that_is_not_float32_is_refused_naming_the_users_parameter(dtype):
    """The error named Dynamo's lifted placeholder ('state0'); bitmix.compile names 'body.0.weight'."""
    torch._dynamo.reset()
    model = _Named().to(dtype).eval()
    with pytest.raises(BitmixError, match=rf"^model parameter 'body.0.weight' is {dtype}; bitmix compiles float32"):
        torch.compile(model, backend="bitmix")(torch.randn(4, 16, dtype=dtype))


def test_unknown_option_is_one_line():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    compiled = torch.compile(model, backend="bitmix", options={"budgett": 0.5})
    with pytest.raises(BitmixError, match="unknown option 'budgett'") as err:
        compiled(torch.randn(2, 8))
    assert "\n" not in str(err.value)


def test_options_that_are_not_a_dict_are_one_line():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Sequential(nn.Linear(8, 4)).eval(), backend="bitmix", options=["target"])
    with pytest.raises(BitmixError, match=r"options for torch.compile\(backend='bitmix'\) must be a dict .*got list"):
        compiled(torch.randn(2, 8))


def test_labeled_data_method_is_one_line():
    torch._dynamo.reset()
    compiled = torch.compile(nn.Sequential(nn.Linear(8, 4)).eval(), backend="bitmix", options={"method": "alps"})
    with pytest.raises(BitmixError, match="needs labeled data"):
        compiled(torch.randn(2, 8))


def test_sqnr_scores_on_the_first_call_inputs():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(16, 8)
    compiled = torch.compile(model, backend="bitmix", options={"method": "sqnr", "target": "int4int2-npu"})
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    assert not torch.equal(out, ref) and _cosine(out, ref) > 0.9


def test_graph_breaks_and_dynamic_recompiles_stay_on_kernels():
    """A data-dependent branch splits the graph (one piece has no layer and runs eagerly); a second batch
    size makes Dynamo recompile with a symbolic batch, which bitmix exports symbolically too."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 16)
            self.out = nn.Linear(16, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x)).mean((2, 3))
            if h.sum() > 0:
                h = h * 2
            return self.out(torch.relu(self.fc(h)))

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Net().eval()
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no eager fallback warning
        for batch in (4, 6, 9):
            x = torch.randn(batch, 3, 8, 8)
            out, ref = compiled(x), model(x)
            assert out.shape == (batch, 2)
            assert not torch.equal(out, ref)
            assert _cosine(out, ref) > 0.95


def test_dynamic_true_with_norm_layers_and_an_item_that_changes_every_call():
    """`dynamic=True` passes a LayerNorm's / BatchNorm's eps as a 0-d tensor read back with .item(), which export
    cannot trace: it is written into the graph, and a changed eps runs the graph as traced. A `.item()` graph
    break passes a float that changes every call into the next piece as a 0-d tensor input."""

    class Norms(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc, self.ln, self.out = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
            return self.out(torch.relu(self.ln(self.fc(h))))

    class Item(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h + h.mean().item())

    torch.manual_seed(0)
    for model, shape, kwargs in ((Norms().eval(), (3, 8, 8), {"dynamic": True}), (Item().eval(), (16,), {})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="bitmix", **kwargs)
        with torch.no_grad():
            for batch in (4, 7, 5):
                x = torch.randn(batch, *shape)
                out, ref = compiled(x), model(x)
                assert not torch.equal(out, ref) and _cosine(out, ref) > 0.99

    # The piece checks the written-in values on every call: another eps runs the graph as traced, in float.
    from bitmix.compiler.backend import bitmix_backend

    seen: dict = {}

    def spy(gm, example_inputs, **kwargs):
        seen.update(args=list(example_inputs), run=bitmix_backend(gm, example_inputs, **kwargs))
        return seen["run"]

    torch._dynamo.reset()
    model, x = Norms().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.compile(model, backend=spy, dynamic=True)(x)
        args = [int(a.node.hint) if isinstance(a, torch.SymInt) else a for a in seen["args"]]  # sizes as a call has
        eps = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 0 and float(a) == 1e-5]
        assert len(eps) == 2  # the BatchNorm's and the LayerNorm's (the BatchNorm's momentum is a third float)
        for i in eps:
            args[i] = torch.tensor(0.5, dtype=args[i].dtype)
        model.bn.eps = model.ln.eps = 0.5
        torch.testing.assert_close(seen["run"](*args)[0], model(x))  # a Dynamo graph returns a tuple


def _held_out(inputs: tuple[torch.Tensor, ...], data) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like `inputs` that the first call (the calibration) never saw."""
    if data is not None:
        return tuple(t[-inputs[0].shape[0]:] for t in data.test.inputs)
    gen = torch.Generator().manual_seed(1)
    return tuple(torch.randn(t.shape, generator=gen) if t.is_floating_point() else
                 torch.randint(0, int(t.max()) + 1, t.shape, generator=gen) if t.max() > 1 else t for t in inputs)


def _zoo_case(name: str) -> tuple[float, tuple[torch.Tensor, ...]]:
    """Cosine to FP32 on held-out inputs of the first call's shape (the first call calibrates on its own tensors)."""
    torch._dynamo.reset()
    model, inputs, data = zoo_entry(name)
    if name.startswith("digits"):
        inputs = (data.test.inputs[0][:32],)
    compiled = torch.compile(model, backend="bitmix")
    other = _held_out(inputs, data)
    with torch.no_grad():
        compiled(*inputs)
        out, ref = compiled(*other), model(*other)
    assert not torch.equal(out, ref)
    return _cosine(out, ref), inputs


# Measured held-out cosine to FP32 at the defaults (int8-npu, budget 1.0, calibrated on the first call):
# digits-cnn 0.998, digits-mlp 0.9998, resnet18 0.99998; bars from issue 17 where the model allows them.
@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_zoo_digits(name):
    cosine, _ = _zoo_case(name)
    assert cosine > 0.995


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zoo_cnns(name):
    cosine, _ = _zoo_case(name)
    assert cosine > 0.999


@pytest.mark.slow
def test_zoo_mobilenetv2():
    """The random-init MobileNetV2 amplifies any perturbation: relative weight noise of 1e-3 (about 10-bit
    weights) alone costs 8.5e-4 of 1 - cosine in FP32 (resnet18: 1.4e-6), so int8 calibrated on one image
    holds ~0.97-0.98 held out, as ONNX Runtime's int8 does on it."""
    cosine, _ = _zoo_case("mobilenetv2")
    assert cosine > 0.95


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "bert-base"])
def test_zoo_transformers(name):
    cosine, _ = _zoo_case(name)
    assert cosine > 0.9


def test_a_buffer_the_forward_writes_counts_only_the_users_calls():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CallCounter().eval()
    x = torch.randn(16, 8)
    compiled = torch.compile(model, backend="bitmix")
    with torch.no_grad():
        for call in (1, 2):
            out = compiled(x)
            assert float(model.calls) == call  # the compile's own passes on the first call do not count
            assert (out - (model.fc(x) + call)).abs().max() < 0.05
