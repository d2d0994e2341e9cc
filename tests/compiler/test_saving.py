"""cm.save -> bitmix.load in a fresh process: bit-identical outputs, the report rides along."""

import io
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bitmix
from bitmix.errors import BitmixError
from tests.conftest import zoo_entry

ROOT = Path(__file__).resolve().parents[2]
CHECK = """
import sys, torch, bitmix
model = bitmix.load(sys.argv[1])
saved = torch.load(sys.argv[2])
for inputs, expected in saved:
    out = model(*inputs)
    assert torch.equal(out, expected), float((out - expected).abs().max())
assert model.report is not None and model.report.accuracy["example_cosine"] > 0
print("ok", model.report.model)
"""


def _roundtrip(tmp_path: Path, model: nn.Module, inputs: tuple, more: list[tuple], name: str,
               target: str = "int8-npu", data: object = None) -> None:
    cm = bitmix.compile(model, inputs, target=target, budget=1.0, data=data,
                        options=bitmix.CompileOptions(frontier_points=0, name=name))
    path = cm.save(tmp_path / f"{name}.pt2")
    cases = [(x, cm(*x)) for x in [inputs, *more]]
    torch.save(cases, tmp_path / "expected.pt")
    run = subprocess.run([sys.executable, "-c", CHECK, str(path), str(tmp_path / "expected.pt")], cwd=ROOT,
                         capture_output=True, text=True, timeout=900, env={"BITMIX_QUIET": "1", "HF_HUB_OFFLINE": "1",
                                                                           "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == f"ok {name}"


def _zoo(tmp_path: Path, name: str) -> None:
    model, inputs, data = zoo_entry(name)
    if name.startswith("digits"):
        more = [(data.test.inputs[0][:3],)]
    elif name in ("minilm", "bert-base"):
        ids, mask = inputs
        more = [(torch.cat([ids, ids, ids])[:, :32], torch.cat([mask, mask, mask])[:, :32])]
    else:
        more = [(torch.randn(2, *inputs[0].shape[1:]),)]
    _roundtrip(tmp_path, model, inputs, more, name)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp"])
def test_zoo_roundtrip(tmp_path, name):
    _zoo(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm", "mobilenetv2", "resnet18", "resnet50", "bert-base"])
def test_zoo_roundtrip_large(tmp_path, name):
    _zoo(tmp_path, name)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.out = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 32**0.5, dim=-1)
        return self.out(scores @ self.v(x))


def test_4_bit_attention_roundtrip_keeps_rotations_and_row_steps(tmp_path):
    """At 4-bit activations linears rotate their inputs online and linears and matmuls step per row."""
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    calib = torch.randn(16, 8, 32, generator=torch.Generator().manual_seed(1))
    _roundtrip(tmp_path, _Attention(), (x,), [(torch.randn(3, 8, 32),)], "attention4", "int4-npu", calib)


def test_torch_save_points_to_cm_save():
    torch.manual_seed(0)
    cm = bitmix.compile(nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8), target="int8-npu", budget=1.0,
                        options=bitmix.CompileOptions(frontier_points=0))
    with pytest.raises(BitmixError, match=r"cm.save\('model.pt2'\)"):
        torch.save(cm, io.BytesIO())
    with pytest.raises(BitmixError, match="save to a .pt2 file"):
        cm.save("model.pth")
    with pytest.raises(BitmixError, match=r"cannot write '/proc/bitmix/model.pt2' .*writable folder"):
        cm.save("/proc/bitmix/model.pt2")


def test_torch_save_of_a_loaded_model_points_to_its_file(tmp_path):
    import copy

    torch.manual_seed(0)
    cm = bitmix.compile(nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8), target="int8-npu",
                        options=bitmix.CompileOptions(frontier_points=0))
    loaded = bitmix.load(cm.save(tmp_path / "model.pt2"))
    with pytest.raises(BitmixError, match=r"loaded bitmix model cannot be pickled .*keep the .pt2 file"):
        torch.save(loaded, io.BytesIO())
    x = torch.randn(3, 8)
    assert torch.equal(copy.deepcopy(loaded)(x), loaded(x))  # a copy is still made without pickling


def test_simulate_on_a_loaded_model_is_one_line(tmp_path):
    cm = bitmix.compile(nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8), target="int8-npu",
                        options=bitmix.CompileOptions(frontier_points=0))
    loaded = bitmix.load(cm.save(tmp_path / "model.pt2"))
    loaded(torch.randn(3, 8))
    with pytest.raises(BitmixError, match=r"loaded bitmix model cannot re-simulate .*bitmix.print_report"):
        loaded.simulate()  # was AttributeError: 'LoadedModel' object has no attribute 'simulate'


def test_load_bad_paths(tmp_path):
    with pytest.raises(BitmixError, match="no saved model"):
        bitmix.load(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    torch_log = logging.getLogger("torch.export")
    torch_log.addHandler(handler)
    try:
        with pytest.raises(BitmixError, match="not a torch.export program"):
            bitmix.load(tmp_path / "junk.pt2")
    finally:
        torch_log.removeHandler(handler)
    assert not records  # torch's own multi-line log of the failure stays quiet


def test_written_by_save_tells_saved_models_from_plain_programs(tmp_path):
    from bitmix.compiler.saving import written_by_save

    model, x = nn.Sequential(nn.Linear(8, 4)).eval(), torch.randn(2, 8)
    saved = bitmix.compile(model, x, target="int8-npu", options=bitmix.CompileOptions(frontier_points=0)
                           ).save(tmp_path / "saved.pt2")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "plain.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    assert written_by_save(saved)
    assert not any(written_by_save(tmp_path / name) for name in ("plain.pt2", "junk.pt2", "missing.pt2"))


def _damaged_copies(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A saved model, the same with a few bits flipped in a weight file, and with its input spec cut short."""
    import zipfile

    torch.manual_seed(0)
    cm = bitmix.compile(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), torch.randn(2, 64),
                        target="int8-npu", options=bitmix.CompileOptions(frontier_points=0))
    good = cm.save(tmp_path / "good.pt2")
    with zipfile.ZipFile(good) as z:
        infos = z.infolist()
        members = {i.filename: z.read(i) for i in infos}
    weight = max((i for i in infos if "/data/weights/" in i.filename), key=lambda i: i.file_size)
    assert weight.compress_type == zipfile.ZIP_STORED
    raw = bytearray(good.read_bytes())
    name_len, extra_len = (int.from_bytes(raw[weight.header_offset + k: weight.header_offset + k + 2], "little")
                           for k in (26, 28))
    raw[weight.header_offset + 30 + name_len + extra_len + weight.file_size // 2] ^= 0x04  # one bit of bit rot
    rotted = tmp_path / "rotted.pt2"
    rotted.write_bytes(bytes(raw))
    cut = tmp_path / "cut.pt2"
    with zipfile.ZipFile(cut, "w") as z:
        for name, data in members.items():
            z.writestr(name, data[: len(data) // 2] if name.endswith("bitmix/inputs.json") else data)
    return good, rotted, cut


def test_load_rejects_damaged_archives_in_one_line(tmp_path):
    good, rotted, cut = _damaged_copies(tmp_path)
    x = torch.randn(3, 64)
    assert bitmix.load(good)(x).shape == (3, 4)
    with pytest.raises(BitmixError, match=r"rotted.pt2 is damaged \(.* fails its checksum\); save the model again"):
        bitmix.load(rotted)
    with pytest.raises(BitmixError, match=r"cut.pt2 has an unreadable bitmix input spec .*; save the model again"):
        bitmix.load(cut)



def _with_input_spec(saved: Path, out: Path, edit: Any) -> Path:
    """A copy of `saved` whose bitmix input spec is `edit(spec as a dict)`."""
    import json
    import zipfile

    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("bitmix/inputs.json"):
                data = json.dumps(edit(json.loads(data))).encode()
            dst.writestr(info, data)
    return out


class _IntegerMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(30, 8), nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids) * mask.unsqueeze(-1).float())


def test_a_file_saved_before_input_dtypes_converts_integer_inputs_from_its_program(tmp_path):
    ids, mask = torch.randint(0, 30, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    cm = bitmix.compile(_IntegerMask().eval(), (ids, mask), target="int8-npu",
                        options=bitmix.CompileOptions(frontier_points=0))
    saved = cm.save(tmp_path / "ids.pt2")
    older = _with_input_spec(saved, tmp_path / "older.pt2", lambda spec: {k: v for k, v in spec.items()
                                                                          if k != "dtypes"})
    assert torch.equal(bitmix.load(older)(ids.int(), mask.int()), cm(ids, mask))
    bad = _with_input_spec(saved, tmp_path / "bad.pt2", lambda spec: {**spec, "dtypes": ["int65"]})
    with pytest.raises(BitmixError, match=r"bad.pt2 has an unreadable bitmix input spec \(TypeError: 'int65' is not"):
        bitmix.load(bad)


@pytest.mark.parametrize("name", ["gated", "keyword"])
def test_a_model_compiled_from_a_dict_loads_with_the_same_call_styles(tmp_path, name):
    """The input spec saved with the program keeps the bound order and names: a loaded model takes the inputs of a
    dict-compiled (or keyword-only) model positionally, by name or as `**enc`, with the compiled model's outputs."""
    from tests.compiler.test_capture import Encoding, Gated, KeywordOnly
    from tests.compiler.test_pipeline import _calls

    torch.manual_seed(0)
    x, t = torch.randn(8, 16), torch.randn(8, 8)
    model, example, data = ((Gated(), Encoding(t=t, x=x), (x, t)) if name == "gated"
                             else (KeywordOnly(), {"x": x, "y": t}, (t, x)))  # data: in the forward's order
    cm = bitmix.compile(model.eval(), example, target="int8-npu", data=data,
                        options=bitmix.CompileOptions(frontier_points=0))
    loaded = bitmix.load(cm.save(tmp_path / f"{name}.pt2"))
    assert loaded.input_spec.names == cm.input_spec.names
    x, t = torch.randn(3, 16), torch.randn(3, 8)
    calls = _calls(name, x, t)[2]
    want = cm(*calls[0][0])
    for args, kwargs in calls:
        assert torch.equal(loaded(*args, **kwargs), want)


@pytest.fixture(scope="module")
def compiled_and_loaded(tmp_path_factory):
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    cm = bitmix.compile(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), x, target="int8-npu",
                        data=x, options=bitmix.CompileOptions(frontier_points=0))
    return cm, cm.save(tmp_path_factory.mktemp("kept") / "model.pt2"), x


MOVES = {  # what a torch user may call on a model -> the refusal (None: taken, and changes nothing)
    "cpu": (lambda m: m.cpu(), None), "float": (lambda m: m.float(), None), "to cpu": (lambda m: m.to("cpu"), None),
    "to float32": (lambda m: m.to(torch.float32), None), "eval": (lambda m: m.eval(), None),
    "train": (lambda m: m.train(), None), "channels_last": (lambda m: m.to(memory_format=torch.channels_last), None),
    "to meta": (lambda m: m.to("meta"), "cannot move to meta; keep it on the CPU"),
    "cuda": (lambda m: m.cuda(), "cannot move"),
    "half": (lambda m: m.half(), r"cannot convert to torch.float16; cast its outputs instead \(cm\(x\).to"),
    "double": (lambda m: m.double(), "cannot convert to torch.float64"),
    "to bfloat16": (lambda m: m.to(torch.bfloat16), "cannot convert to torch.bfloat16"),
    "inside a module": (lambda m: nn.Sequential(m).half(), "cannot convert to torch.float16"),
    "to_empty": (lambda m: m.to_empty(device="cpu"), r"cannot have its tensors replaced \(to_empty\)"),
    "jit.script": (lambda m: torch.jit.script(m), r"^torch.jit.script cannot compile .* cm.save\('model.pt2'\)"),
    "jit.trace": (lambda m: torch.jit.trace(m, torch.randn(8, 8)), r"^torch.jit.trace cannot record .* freeze"),
}


@pytest.mark.parametrize("kind", ["compiled", "loaded"])
@pytest.mark.parametrize("call", list(MOVES))
def test_module_conversions_are_taken_when_they_change_nothing_else_one_line(compiled_and_loaded, kind, call):
    """.to('meta') made cm.fake_quant's tensors meta (its repr then raised), .half() / .to_empty() changed the float
    twin or the saved constants under the same kernels, .cuda() was a raw AssertionError, torch.jit.trace returned a
    module answering every input with the example's outputs, and a loaded model's .eval() raised NotImplementedError."""
    import copy

    cm, path, x = compiled_and_loaded
    model = copy.deepcopy(cm) if kind == "compiled" else bitmix.load(path)
    before = model(x)
    convert, refusal = MOVES[call]
    if refusal is None:
        assert convert(model) is model
    else:
        with pytest.raises(BitmixError, match=refusal):
            convert(model)
    with torch.no_grad():
        assert torch.equal(model(x), before)
        if kind == "compiled":
            assert torch.equal(model.fake_quant.eval()(x), before)
