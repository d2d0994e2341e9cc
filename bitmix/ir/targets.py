"""Targets: a chip configuration plus the precisions each layer may take."""

from __future__ import annotations

from dataclasses import dataclass

from bitmix.errors import BitmixError

SUPPORTED_BITS = (8, 4, 2)


@dataclass(frozen=True)
class Target:
    """Per-layer precision choices on a chip.

    `choices` are ordered highest first. `pin_first_last`, when set, fixes the first
    and last quantizable layers to that precision (the EAGL/ALPS and LSQ setting).
    `chip_config` is an optional TOML file overriding the simulator's chip defaults.
    """

    name: str
    choices: tuple[int, ...]
    pin_first_last: int | None = None
    chip_config: str | None = None

    def __post_init__(self) -> None:
        if not self.choices:
            raise BitmixError(f"target {self.name!r} has no precision choices; give at least one of 8, 4, 2")
        bad = [b for b in self.choices if b not in SUPPORTED_BITS]
        if bad:
            raise BitmixError(f"target {self.name!r}: unsupported precision {bad[0]}; use 8, 4 or 2")
        if self.pin_first_last is not None and self.pin_first_last not in SUPPORTED_BITS:
            raise BitmixError(f"target {self.name!r}: pin_first_last must be 8, 4 or 2")
        object.__setattr__(self, "choices", tuple(sorted(set(self.choices), reverse=True)))

    @property
    def highest(self) -> int:
        return self.choices[0]

    @property
    def lowest(self) -> int:
        return self.choices[-1]

    @property
    def all_bits(self) -> tuple[int, ...]:
        """Every precision a layer can end up at, pinned ones included (highest first)."""
        bits = set(self.choices)
        if self.pin_first_last is not None:
            bits.add(self.pin_first_last)
        return tuple(sorted(bits, reverse=True))

    def pinned(self, layer_names: tuple[str, ...]) -> dict[str, int]:
        """Layers whose precision the target fixes: first and last quantizable layer."""
        if self.pin_first_last is None or not layer_names:
            return {}
        return {layer_names[0]: self.pin_first_last, layer_names[-1]: self.pin_first_last}

    def with_chip_config(self, path: str | None) -> Target:
        return Target(self.name, self.choices, self.pin_first_last, path)


TARGETS: dict[str, Target] = {
    "int4int2-npu": Target("int4int2-npu", (4, 2), pin_first_last=8),
    "mixed-npu": Target("mixed-npu", (8, 4, 2)),
    "int8-npu": Target("int8-npu", (8,)),
    "int4-npu": Target("int4-npu", (4,)),
    "int2-npu": Target("int2-npu", (2,)),
}


def get_target(target: str | Target, chip_config: str | None = None) -> Target:
    """Resolve a target name (or pass a `Target` through), optionally with a chip TOML file."""
    if isinstance(target, Target):
        resolved = target
    elif target in TARGETS:
        resolved = TARGETS[target]
    else:
        raise BitmixError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}")
    return resolved.with_chip_config(chip_config) if chip_config else resolved
