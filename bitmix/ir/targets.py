"""Targets: a chip configuration plus the precisions (weight bits, activation bits) each layer may take.

Reference notes: which pairs the chip runs, and why.
- NorthPole computes at 8, 4 and 2 bits, 2048 / 4096 / 8192 ops per core per cycle, with "8, 4 and
  2-bit integer weights and activations" (northpole_sim.md §1.1, Science 2023 quote): 8/8, 4/4, 2/2.
- Its language-model deployments run 4-bit weights with 8-bit activations (A8-W4, northpole_sim.md
  §1.3; SiLQ A8-C8-W4, §2): a narrower weight operand in a wider MAC mode. We take the datapath to
  be SIMD-packed into 8-bit words (Ottati's reading, §5), so a narrow weight is sign-extended into
  the wider activation's lanes: 4/8, 2/8 and 2/4 run at the activation's rate.
- `w4a8r-npu` is `w4a8-npu` with every eligible linear's input read through the online Hadamard
  rotation ("4/8r", `bitmix.ir.rotation`): the rotation spreads each 4-bit weight row's large entries
  (QuIP, arXiv 2307.13304), at a price in vector work the simulator adds to the layer (MiniLM: more
  than `int8-npu`'s cycles, docs/quality.md); an accuracy choice, not a cheaper one.
- Weights wider than activations (8/4, 8/2, 4/2) appear in no source read; they would also waste the
  weight SRAM they are priced for, so they are not offered (a one-line BitmixError, `check_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitmix.errors import BitmixError
from bitmix.ir.precision import SUPPORTED_BITS, Precision, chip_precision

__all__ = ["SUPPORTED_BITS", "TARGETS", "Target", "get_target"]

CHIP_PAIRS = tuple(Precision(w, a) for w, a in ((8, 8), (4, 8), (4, 4), (2, 8), (2, 4), (2, 2)))


@dataclass(frozen=True)
class Target:
    """Per-layer precision choices on a chip.

    `choices` are `Precision` pairs ordered highest (most costly) first; an int b is read as b/b.
    `pin_first_last`, when set, fixes the first and last quantizable layers to that precision
    (the EAGL/ALPS and LSQ setting). `chip_config` is an optional TOML file overriding the
    simulator's chip defaults.
    """

    name: str
    choices: tuple[Precision, ...]
    pin_first_last: Precision | None = None
    chip_config: str | None = None

    def __post_init__(self) -> None:
        if not self.choices:
            raise BitmixError(f"target {self.name!r} has no precision choices; give at least one of 8, 4, 2")
        choices = tuple(chip_precision(b, f"target {self.name!r}: choice") for b in self.choices)
        object.__setattr__(self, "choices", tuple(sorted(set(choices), reverse=True)))
        if self.pin_first_last is not None:
            pin = chip_precision(self.pin_first_last, f"target {self.name!r}: pin_first_last")
            object.__setattr__(self, "pin_first_last", pin)

    @property
    def highest(self) -> Precision:
        return self.choices[0]

    @property
    def lowest(self) -> Precision:
        return self.choices[-1]

    @property
    def all_bits(self) -> tuple[Precision, ...]:
        """Every precision a layer can end up at, pinned ones included (highest first)."""
        bits = set(self.choices)
        if self.pin_first_last is not None:
            bits.add(self.pin_first_last)
        return tuple(sorted(bits, reverse=True))

    def pinned(self, layer_names: tuple[str, ...]) -> dict[str, Precision]:
        """Layers whose precision the target fixes: first and last quantizable layer."""
        if self.pin_first_last is None or not layer_names:
            return {}
        return {layer_names[0]: self.pin_first_last, layer_names[-1]: self.pin_first_last}

    def with_chip_config(self, path: str | None) -> Target:
        return Target(self.name, self.choices, self.pin_first_last, path)


TARGETS: dict[str, Target] = {
    "int4int2-npu": Target("int4int2-npu", (4, 2), pin_first_last=8),  # type: ignore[arg-type]
    "w4a8-npu": Target("w4a8-npu", (Precision(4, 8), Precision(2, 8)), pin_first_last=8),  # type: ignore[arg-type]
    "w4a8r-npu": Target("w4a8r-npu", (Precision(4, 8, True), Precision(2, 8, True)), pin_first_last=8),  # type: ignore[arg-type]
    "mixed-npu": Target("mixed-npu", CHIP_PAIRS),
    "int8-npu": Target("int8-npu", (8,)),  # type: ignore[arg-type]
    "int4-npu": Target("int4-npu", (4,)),  # type: ignore[arg-type]
    "int2-npu": Target("int2-npu", (2,)),  # type: ignore[arg-type]
}

DEFAULT_TARGET = "int4int2-npu"  # what `compile`, the CLI and the benches use when no target is named


def get_target(target: str | Target, chip_config: str | None = None) -> Target:
    """Resolve a target name (or pass a `Target` through), optionally with a chip TOML file."""
    if isinstance(target, Target):
        resolved = target
    elif target in TARGETS:
        resolved = TARGETS[target]
    else:
        raise BitmixError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
    return resolved.with_chip_config(chip_config) if chip_config else resolved
