"""The `Report`: what a compile chose, what it costs on the chip, what it loses in quality.

Plain data: `to_dict()` follows the report.json contract of DESIGN.md, `write_json(report, path)`
writes it and `load_report(path)` reads it back. Renderers are functions over a Report in their
own modules (`html`, `plots`, `terminal`); `bitmix.report.save_report` calls them. Nothing here
imports a renderer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bitmix.errors import BitmixError

SIMULATED_KEYS = ("cycles", "latency_s", "throughput_fps", "energy_per_frame_j", "power_w", "fps_per_w",
                  "utilization", "chips")


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    bits: int | None  # weight bits; None: stays FP32 (no kernel)
    macs: int
    params: int
    cycles: float
    energy_j: float
    score: float | None
    bound: str = ""
    pinned: bool = False
    a_bits: int | None = None  # activation bits (None with bits set: the same as `bits`)
    rotated: bool = False  # a "w/ar" choice: the input read through the online rotation at 8-bit activations

    def __post_init__(self) -> None:
        bits = self.bits
        if isinstance(bits, tuple):  # a Precision given whole
            object.__setattr__(self, "bits", bits[0])
            object.__setattr__(self, "a_bits", bits[1])
            object.__setattr__(self, "rotated", bool(bits[2]) if len(bits) > 2 else False)
        elif bits is not None and self.a_bits is None:
            object.__setattr__(self, "a_bits", bits)

    @property
    def precision(self) -> str:
        """"w/a" ("w/ar" rotated) for display ("fp32" when no kernel runs the layer)."""
        return "fp32" if self.bits is None else f"{self.bits}/{self.a_bits}{'r' if self.rotated else ''}"


@dataclass(frozen=True)
class Report:
    model: str
    target: str
    method: str
    budget: float | dict[str, float]
    layers: tuple[LayerRow, ...]
    simulated: dict[str, Any]
    accuracy: dict[str, Any]
    timings_s: dict[str, float]
    frontier: tuple[dict[str, Any], ...] = ()
    uniform: tuple[dict[str, Any], ...] = ()
    energy_breakdown_j: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def budget_text(self) -> str:
        """The budget for titles: a fraction to 4 significant digits, or the goals given."""
        if isinstance(self.budget, dict):
            return ", ".join(f"{k} {v:.4g}" for k, v in self.budget.items())
        return f"{self.budget:.4g}"

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON values; a non-finite number (e.g. pareto-greedy's unproven optimality gap,
        inf) is None, since JSON has no Infinity or NaN."""
        return _finite({
            "model": self.model,
            "target": self.target,
            "method": self.method,
            "budget": self.budget,
            "layers": [asdict(row) for row in self.layers],
            "simulated": dict(self.simulated),
            "accuracy": dict(self.accuracy),
            "timings_s": dict(self.timings_s),
            "frontier": list(self.frontier),
            "uniform": list(self.uniform),
            "energy_breakdown_j": dict(self.energy_breakdown_j),
            "warnings": list(self.warnings),
            "info": dict(self.info),
        })

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        missing = [k for k in ("model", "target", "method", "budget", "layers", "simulated", "accuracy", "timings_s")
                   if k not in d]
        if missing:
            raise BitmixError(f"not a bitmix report: missing key {missing[0]!r}")
        try:
            return cls(
                model=d["model"], target=d["target"], method=d["method"], budget=d["budget"],
                layers=tuple(LayerRow(**row) for row in d["layers"]), simulated=dict(d["simulated"]),
                accuracy=dict(d["accuracy"]), timings_s=dict(d["timings_s"]), frontier=tuple(d.get("frontier", ())),
                uniform=tuple(d.get("uniform", ())), energy_breakdown_j=dict(d.get("energy_breakdown_j", {})),
                warnings=tuple(d.get("warnings", ())), info=dict(d.get("info", {})),
            )
        except (TypeError, ValueError) as exc:  # a layer row or section of the wrong shape
            raise BitmixError(f"not a bitmix report: {exc}; write reports with bitmix.save_report") from None


def fidelity_inputs_text(accuracy: dict[str, Any]) -> str:
    """What the fidelity numbers were measured on, e.g. "the 32 calibration inputs (in-sample: they set the
    activation ranges)": in-sample inputs only show the kernels compute what FP32 does, not held-out quality."""
    kind = accuracy.get("fidelity_inputs")
    if kind is None:  # a report written before the field
        return "the calibration (or, without them, the example) inputs"
    n = accuracy.get("fidelity_examples")
    text = f"the {n} {kind} input{'s' if n != 1 else ''}" if n is not None else f"the {kind} inputs"
    return text + (" (in-sample: they set the activation ranges)" if accuracy.get("fidelity_in_sample") else "")


def fidelity_line(accuracy: dict[str, Any]) -> str | None:
    """The fidelity sentence the terminal and HTML reports show, or None when the compile measured none."""
    if accuracy.get("example_cosine") is None:
        return None
    return (f"fidelity to FP32 on {fidelity_inputs_text(accuracy)}: cosine {accuracy['example_cosine']:.4f}, "
            f"max relative error {_fmt_err(accuracy.get('example_max_rel_err'))}")


def _fmt_err(err: float | None) -> str:
    return "–" if err is None else f"{err:.3g}"


def write_json(report: Report, path: str | Path) -> Path:
    """report.json (the contract) at `path`."""
    p = Path(path)
    p.write_text(json.dumps(report.to_dict(), indent=2, default=_json_default, allow_nan=False))
    return p


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (inside dicts, lists and tuples) replaced by None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy or torch scalar
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(obj: object) -> Any:
    if hasattr(obj, "item"):
        return obj.item()  # numpy scalars
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def load_report(path: str | Path) -> Report:
    """Read a report.json (or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    if not p.exists():
        raise BitmixError(f"no report at {p}; pass the --out directory of `bitmix compile` or its report.json")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise BitmixError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return Report.from_dict(data)
