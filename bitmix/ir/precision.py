"""A precision choice: (weight bits, activation bits), printed "w/a"; a plain int b means b/b.

A pair with 8-bit activations may also read its input through the online Hadamard rotation
(`bitmix.ir.rotation`), printed "w/ar" (e.g. "4/8r"): the same MAC work plus the rotation's vector work,
for a narrow weight row whose large entries the rotation spreads (QuIP's incoherence processing). At 4
and 2-bit activations every eligible linear is rotated already, so "r" is only read at 8 bits.

Ordering is by cost on a NorthPole-style chip, highest first when sorted in reverse:
the MAC array runs at the wider operand's rate, so `max(w, a)` dominates, then the weight
width (resident bytes, streaming), then the activation width. So 8/8 > 4/8 > 2/8 > 4/4 >
2/4 > 2/2 (the ordering key is one-to-one; a rotated pair sits just above its plain one). The
shorthand holds inside too: b/b equals and hashes like the int b, so `{4: ...}[Precision(4, 4)]`
and `4 in target.choices` work.
"""

from __future__ import annotations

from typing import NamedTuple

from bitmix.errors import BitmixError

SUPPORTED_BITS = (8, 4, 2)
ROTATABLE_ACTIVATION_BITS = 8  # narrower activations are rotated by the rule itself (`bitmix.ir.rotation`)


class Precision(NamedTuple):
    """Weight width `w` and activation (input operand) width `a` of one layer."""

    w: int
    a: int
    rotated: bool = False

    @property
    def compute(self) -> int:
        """The MAC mode: the wider operand sets the rate (northpole_sim.md §6.1)."""
        return max(self.w, self.a)

    def key(self) -> tuple[int, int, int, bool]:
        return (self.compute, self.w, self.a, self.rotated)

    @property
    def plain(self) -> Precision:
        """The same widths without the rotation."""
        return Precision(self.w, self.a)

    def __str__(self) -> str:
        return f"{self.w}/{self.a}{'r' if self.rotated else ''}"

    __repr__ = __str__  # error messages list choices as [4/8, 2/8]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int) and not isinstance(other, bool):
            return self.w == self.a == other and not self.rotated
        if isinstance(other, tuple) and not isinstance(other, Precision) and len(other) == 2:
            return (self.w, self.a) == other and not self.rotated
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        if self.rotated:
            return tuple.__hash__(self)
        return hash(self.w) if self.w == self.a else hash((self.w, self.a))

    def __lt__(self, other: object) -> bool:  # type: ignore[override]
        return self.key() < as_precision(other).key()  # type: ignore[arg-type]

    def __le__(self, other: object) -> bool:  # type: ignore[override]
        return self.key() <= as_precision(other).key()  # type: ignore[arg-type]

    def __gt__(self, other: object) -> bool:  # type: ignore[override]
        return self.key() > as_precision(other).key()  # type: ignore[arg-type]

    def __ge__(self, other: object) -> bool:  # type: ignore[override]
        return self.key() >= as_precision(other).key()  # type: ignore[arg-type]


PrecisionLike = Precision | int | str | tuple


def as_precision(value: object, what: str = "precision") -> Precision:
    """Read an int b (b/b), a "w/a", "w/ar" or "b" string, or a (w, a) pair; one-line BitmixError otherwise."""
    if isinstance(value, Precision):
        return value
    rotated = False
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            w = a = value
        elif isinstance(value, str):
            text = value.strip()
            rotated = text.endswith("r")
            parts = text.removesuffix("r").split("/")
            if rotated and len(parts) != 2:
                raise ValueError
            if len(parts) == 1:
                w = a = int(parts[0])
            elif len(parts) == 2:
                w, a = int(parts[0]), int(parts[1])
            else:
                raise ValueError
        elif isinstance(value, tuple | list) and len(value) == 2:
            w, a = (int(v) for v in value)
        else:
            raise ValueError
    except (TypeError, ValueError):
        raise BitmixError(f"{what} {value!r} is not a precision; give bits (8, 4, 2) or a 'w/a' pair such as "
                          "'4/8' ('4/8r' with the input rotated)") from None
    for bits in (w, a):
        if bits not in SUPPORTED_BITS:
            raise BitmixError(f"{what} {value!r}: unknown precision (width {bits}); widths must be 8, 4 or 2")
    if rotated and a != ROTATABLE_ACTIVATION_BITS:
        raise BitmixError(f"{what} {value!r}: 'r' (rotated input) applies to 8-bit activations only; at 4 and 2 "
                          f"bits every eligible linear is rotated already, so write '{w}/{a}'")
    return Precision(w, a, rotated)


def check_runs(p: Precision, what: str = "precision") -> Precision:
    """A pair the chip runs: weights no wider than activations (see `targets` reference notes)."""
    if p.w > p.a:
        raise BitmixError(f"{what} {p}: the chip does not run weights wider than activations; use "
                          f"{p.w}/{p.w} or {p.a}/{p.a} (or any w/a with w <= a)")
    if p.rotated and p.a != ROTATABLE_ACTIVATION_BITS:
        raise BitmixError(f"{what} {p}: 'r' (rotated input) applies to 8-bit activations only; use {p.plain}")
    return p


def chip_precision(value: object, what: str = "precision") -> Precision:
    """`as_precision` followed by `check_runs`: what every API boundary accepts."""
    return check_runs(as_precision(value, what), what)


def format_assignment(assignment: dict[str, Precision]) -> dict[str, str]:
    """JSON form of an assignment: "w/a" strings."""
    return {name: str(as_precision(p)) for name, p in assignment.items()}
