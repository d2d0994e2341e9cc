"""Dynamic shapes: one bitmix.compile serves many batch sizes and sequence lengths; other shapes fail in one line."""

import pytest
import torch
from torch import nn
from torch.export import Dim

import bitmix
from bitmix.errors import BitmixError
from tests.conftest import zoo_entry


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _compile(model, x, dynamic_shapes="auto"):
    return bitmix.compile(model, x, target="int8-npu", budget=1.0,
                          options=bitmix.CompileOptions(frontier_points=0, dynamic_shapes=dynamic_shapes))


def test_batch_is_symbolic_and_priced_as_run():
    cm = _compile(_mlp(), torch.randn(4, 16))
    assert cm.input_spec.dynamic == {"input": {0: cm.input_spec.dims[0][0]}}
    for batch in (1, 3, 64):
        x = torch.randn(batch, 16)
        cm.reset_calls()
        with torch.no_grad():
            assert torch.equal(cm(x), cm.fake_quant(x))  # kernels == fake-quant at every batch
        assert cm.recorder.calls[0][1] == (batch, 16)  # cm.simulate() prices these shapes


def test_a_fixed_dimension_is_a_one_line_error():
    cm = _compile(_mlp(), torch.randn(4, 16))
    with pytest.raises(BitmixError, match="input 'input' dim 1 is fixed at 16"):
        cm(torch.randn(2, 8))


def test_an_input_of_another_kind_is_a_one_line_error(tmp_path):
    cm = _compile(_mlp(), torch.randn(4, 16))
    x = torch.randn(2, 16)
    assert torch.equal(cm(x.double()), cm(x.double().float()))  # another float width is read as float32
    with pytest.raises(BitmixError, match=r"input 'input' must be a float tensor .* got torch.int64"):
        cm(x.long())
    with pytest.raises(BitmixError, match="must be a float tensor"):
        bitmix.load(cm.save(tmp_path / "mlp.pt2"))(x.bool())


def test_a_complex_input_is_refused_not_read_as_its_real_part(tmp_path):
    """Eager PyTorch refuses a complex input into a real linear; the compiled model dropped its imaginary part."""
    cm = _compile(_mlp(), torch.randn(4, 16))
    z = torch.complex(torch.randn(2, 16), torch.randn(2, 16))
    for model in (cm, bitmix.load(cm.save(tmp_path / "mlp.pt2"))):
        with pytest.raises(BitmixError, match=r"'input' must be a float tensor .* got torch.complex64; .*x.real"):
            model(z)


class _LearnedPositions(nn.Module):
    """GPT-2-style positions `pos(arange(T))`: export cannot bound T by the table, indexing past it fails."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.head = nn.Embedding(50, 16), nn.Embedding(12, 16), nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))


def test_indexing_past_a_table_is_a_one_line_error(tmp_path):
    cm = _compile(_LearnedPositions().eval(), torch.randint(0, 50, (2, 8)))
    assert cm(torch.randint(0, 50, (1, 12))).shape == (1, 12, 50)
    for model in (cm, bitmix.load(cm.save(tmp_path / "gpt.pt2"))):
        with pytest.raises(BitmixError, match=r"indexed out of range on inputs 'ids' \(1, 13\)"):
            model(torch.randint(0, 50, (1, 13)))
        with pytest.raises(BitmixError, match="token id past its vocabulary"):
            model(torch.full((1, 4), 50))


def test_static_export_on_request():
    cm = _compile(_mlp(), torch.randn(4, 16), dynamic_shapes=None)
    with pytest.raises(BitmixError, match="dim 0 is fixed at 4"):
        cm(torch.randn(2, 16))


@pytest.mark.parametrize("spec, match", [
    (({0: Dim("b")}, None), "2 entries but the model takes 1"),
    (({0: Dim("b"), 1: Dim("f")},), "f as dynamic but your code specialized it"),
    (({5: Dim("b")},), "names dim 5"),
    ({"nope": {0: Dim("b")}}, "names 'nope'"),
])
def test_bad_dynamic_shapes_spec_is_one_line(spec, match):
    with pytest.raises(BitmixError, match=match) as err:
        _compile(_mlp(), torch.randn(4, 16), dynamic_shapes=spec)
    assert "\n" not in str(err.value)


def test_user_spec_by_argument_name():
    cm = _compile(_mlp(), torch.randn(4, 16), dynamic_shapes={"input": {0: Dim("batch", max=64)}})
    assert cm(torch.randn(64, 16)).shape == (64, 4)
    with pytest.raises(BitmixError, match="takes sizes [01] to 64, got 65"):
        cm(torch.randn(65, 16))


@pytest.mark.slow
def test_minilm_one_compile_serves_lengths_and_batches():
    """One compile at (1, 64) runs 16-128 tokens at batch 1/3/8, kernels bit-identical to fake-quant."""
    model, inputs, data = zoo_entry("minilm")
    cm = _compile(model, inputs)
    ids, mask = data.test.inputs
    for length in (16, 32, 64, 128):
        for batch in (1, 3, 8):
            x = (ids[:batch, :length].repeat(1, 2)[:, :length].contiguous(),
                 mask[:batch, :length].repeat(1, 2)[:, :length].contiguous())
            cm.reset_calls()
            out = cm(*x)
            assert out.shape == (batch, 384)
            with torch.no_grad():
                assert torch.equal(out, cm.fake_quant(*x))
            assert cm.simulate().cycles > 0
    with pytest.raises(BitmixError, match="takes sizes 1 to 512, got 600"):
        cm(torch.zeros(1, 600, dtype=torch.long), torch.ones(1, 600, dtype=torch.long))
    with pytest.raises(BitmixError, match="must equal"):
        cm(torch.zeros(1, 32, dtype=torch.long), torch.ones(1, 16, dtype=torch.long))


class _SkipJoin(nn.Module):
    """Down and up again, joined with the input: a calibration image of another size breaks only the join."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.up(torch.relu(self.down(x))), x], dim=1)


def test_calibration_of_another_size_is_a_one_line_error():
    with pytest.raises(BitmixError, match="calibration data does not fit the model: input 'x' dim 2 is fixed at 16"):
        bitmix.compile(_SkipJoin().eval(), torch.randn(1, 3, 16, 16), "int8-npu", data=torch.randn(4, 3, 32, 32))
    with pytest.raises(BitmixError, match="calibration data does not fit the model: input 'x' must have 4 dim"):
        bitmix.compile(_SkipJoin().eval(), torch.randn(1, 3, 16, 16), "int8-npu", data=torch.randn(4, 3, 16))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(30, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids) * mask.unsqueeze(-1))


def test_inputs_by_name_as_in_eager(tmp_path):
    ids, mask = torch.randint(0, 30, (2, 5)), torch.ones(2, 5)
    cm = _compile(_TwoInputs().eval(), (ids, mask))
    want = cm(ids, mask)
    for model in (cm, bitmix.load(cm.save(tmp_path / "two.pt2"))):
        assert torch.equal(model(ids=ids, mask=mask), want) and torch.equal(model(mask=mask, ids=ids), want)
        assert torch.equal(model(ids, mask=mask), want)
        for kwargs, match in (({"ids": ids, "masks": mask}, "unexpected input 'masks'; the compiled model takes ids, "
                                                             "mask"),
                              ({"ids": ids}, "missing input 'mask'")):
            with pytest.raises(BitmixError, match=match):
                model(**kwargs)
        with pytest.raises(BitmixError, match="'ids' is given by position and by name"):
            model(ids, ids=ids)


def test_a_meta_input_is_one_line(tmp_path):
    cm = _compile(_mlp(), torch.randn(4, 16))
    for model in (cm, bitmix.load(cm.save(tmp_path / "mlp.pt2"))):
        with pytest.raises(BitmixError, match=r"input '\w+' is on the meta device \(a shape without values\)"):
            model(torch.randn(2, 16, device="meta"))


def test_a_numpy_input_or_a_mask_of_another_kind_names_the_conversion():
    cm = _compile(_mlp(), torch.randn(4, 16))
    with pytest.raises(BitmixError, match=r"takes torch tensors, got numpy.ndarray; .*torch.from_numpy"):
        cm(torch.randn(2, 16).numpy())
    masked = _compile(_TwoInputs().eval(), (torch.randint(0, 30, (2, 5)), torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(BitmixError, match=r"'mask' must be a bool tensor .* got torch.int64; convert it \(x.bool"):
        masked(torch.randint(0, 30, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(BitmixError, match=r"input 'mask' must be a tensor, as in the example inputs, got int 1"):
        masked(torch.randint(0, 30, (2, 5)), 1)


class _IntegerMask(_TwoInputs):
    """An integer attention mask made float inside, as Hugging Face models do: the export checks its dtype."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids) * mask.unsqueeze(-1).float())


def test_integer_inputs_of_another_integer_width_are_converted_as_in_eager(tmp_path):
    """int32 token ids and mask into a model exported with int64 ones: eager PyTorch takes them, the exported
    program did not ("Tensor dtype mismatch! Expected: Long, Got: int")."""
    ids, mask = torch.randint(0, 30, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    cm = _compile(_IntegerMask().eval(), (ids, mask))
    assert cm.input_spec.dtypes == ("int64", "int64")
    want = cm(ids, mask)
    for model in (cm, bitmix.load(cm.save(tmp_path / "two.pt2"))):
        assert torch.equal(model(ids.int(), mask.int()), want)
        assert torch.equal(model(ids=ids.to(torch.int16), mask=mask.to(torch.uint8)), want)
        with pytest.raises(BitmixError, match=r"'ids' must be a integer tensor .* got torch.float32"):
            model(ids.float(), mask)  # another kind is still refused, not converted


class _ViewsTheBatch(nn.Module):
    """A reshape that names the batch: a static export keeps it, so only that batch runs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(x.shape[0], 2, 8)).reshape(x.shape[0], -1)


def test_calibration_beside_a_static_batch_names_the_fix():
    with pytest.raises(BitmixError, match=r"static shapes \(batch 2\).*dynamic batch.*pass 2 calibration"):
        bitmix.compile(_ViewsTheBatch().eval(), torch.randn(2, 16), "int8-npu", data=torch.randn(12, 16),
                       options=bitmix.CompileOptions(frontier_points=0, dynamic_shapes=None))


def test_calibration_as_float64_or_as_a_list_of_single_examples():
    model, x = _mlp(), torch.randn(4, 16)
    calib = torch.randn(12, 16)
    want = bitmix.compile(model, x, "int8-npu", data=calib, options=bitmix.CompileOptions(frontier_points=0))
    for data in (calib.double(), list(calib)):
        cm = bitmix.compile(model, x, "int8-npu", data=data, options=bitmix.CompileOptions(frontier_points=0))
        with torch.no_grad():
            assert torch.equal(cm(x), want(x))


class _ScaleArg(nn.Module):
    """A forward with a float argument beside its tensor: the export fixes the float at its default."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc(x) * scale


def test_a_non_tensor_argument_is_named_and_said_to_be_fixed():
    """cm(x, 2.0) reached the lowered graph and raised a raw TypeError (forward() takes 2 positional arguments)."""
    torch.manual_seed(0)
    cm = _compile(_ScaleArg().eval(), torch.randn(4, 16))
    x = torch.randn(2, 16)
    with pytest.raises(BitmixError, match=r"^argument 1 is a float \(2.0\), not a tensor: .* takes only its tensor "
                                          r"inputs \(x\); non-tensor forward arguments were fixed at compile time"):
        cm(x, 2.0)
    with pytest.raises(BitmixError, match=r"^argument 'scale' is a float \(2.0\), not a tensor"):
        cm(x, scale=2.0)


class _ConvAttention(nn.Module):
    """Conv, max pool, transposed conv, grouped conv, then attention over the pixels: every kernel kind."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 8, 3, groups=2))
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.features(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        return self.head(nn.functional.scaled_dot_product_attention(q, k, v).mean(1))


@pytest.mark.parametrize("target", ["int8-npu", "int4int2-npu"])
def test_an_empty_batch_gives_eagers_empty_output(tmp_path, target):
    """cm(x[:0]) was refused ("dim 0 takes sizes 1 or more, got 0") and, past that, the conv kernels refused 0 rows
    and the transposed conv's pixel shuffle reshaped to an ambiguous -1; eager torch returns an empty output."""
    torch.manual_seed(0)
    model = _ConvAttention().eval()
    x = torch.randn(8, 3, 8, 8)
    cm = bitmix.compile(model, x, target, data=x, options=bitmix.CompileOptions(frontier_points=0))
    with torch.no_grad():
        want = model(x[:0])
        assert want.shape == (0, 3)
        for run in (cm, cm.fake_quant.eval(), bitmix.load(cm.save(tmp_path / "m.pt2"))):
            for _ in range(2):  # the second call at the shape takes the conv's cached fast path
                out = run(x[:0])
                assert out.shape == want.shape and out.dtype == want.dtype
        assert torch.equal(cm(x), cm.fake_quant(x))  # a real batch after it is unchanged
    cm(x[:0])
    with pytest.raises(BitmixError, match="^the last forward ran on an empty batch"):
        cm.simulate()


class _FlattensByBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1))


def test_an_empty_batch_the_model_cannot_run_or_a_static_batch_is_one_line():
    torch.manual_seed(0)
    x = torch.randn(4, 4, 4)
    cm = _compile(_FlattensByBatch().eval(), x)
    with pytest.raises(RuntimeError, match="cannot reshape tensor of 0 elements"):
        _FlattensByBatch()(x[:0])  # eager torch fails too
    with pytest.raises(BitmixError, match=r"^the model cannot run an empty batch \(cannot reshape tensor of 0 "):
        cm(x[:0])
    static = _compile(_mlp(), torch.randn(4, 16), dynamic_shapes=None)
    with pytest.raises(BitmixError, match="^input 'input' dim 0 is fixed at 4 by the model \\(got 0\\)"):
        static(torch.randn(0, 16))
