"""A precision choice: (weight bits, activation bits), printed "w/a"; a plain int b means b/b.

Ordering is by cost on a NorthPole-style chip, highest first when sorted in reverse:
the MAC array runs at the wider operand's rate, so `max(w, a)` dominates, then the weight
width (resident bytes, streaming), then the activation width. So 8/8 > 4/8 > 2/8 > 4/4 >
2/4 > 2/2 (the ordering key is one-to-one). The shorthand holds inside too: b/b equals and
hashes like the int b, so `{4: ...}[Precision(4, 4)]` and `4 in target.choices` work.
"""

from __future__ import annotations

from typing import NamedTuple

from bitmix.errors import BitmixError

SUPPORTED_BITS = (8, 4, 2)


class Precision(NamedTuple):
    """Weight width `w` and activation (input operand) width `a` of one layer."""

    w: int
    a: int

    @property
    def compute(self) -> int:
        """The MAC mode: the wider operand sets the rate (northpole_sim.md §6.1)."""
        return max(self.w, self.a)

    def key(self) -> tuple[int, int, int]:
        return (self.compute, self.w, self.a)

    def __str__(self) -> str:
        return f"{self.w}/{self.a}"

    __repr__ = __str__  # error messages list choices as [4/8, 2/8]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, int) and not isinstance(other, bool):
            return self.w == self.a == other
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.w) if self.w == self.a else tuple.__hash__(self)

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
    """Read an int b (b/b), a "w/a" or "b" string, or a (w, a) pair; one-line BitmixError otherwise."""
    if isinstance(value, Precision):
        return value
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            w = a = value
        elif isinstance(value, str):
            parts = value.strip().split("/")
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
                          "'4/8'") from None
    for bits in (w, a):
        if bits not in SUPPORTED_BITS:
            raise BitmixError(f"{what} {value!r}: unknown precision (width {bits}); widths must be 8, 4 or 2")
    return Precision(w, a)


def check_runs(p: Precision, what: str = "precision") -> Precision:
    """A pair the chip runs: weights no wider than activations (see `targets` reference notes)."""
    if p.w > p.a:
        raise BitmixError(f"{what} {p}: the chip does not run weights wider than activations; use "
                          f"{p.w}/{p.w} or {p.a}/{p.a} (or any w/a with w <= a)")
    return p


def chip_precision(value: object, what: str = "precision") -> Precision:
    """`as_precision` followed by `check_runs`: what every API boundary accepts."""
    return check_runs(as_precision(value, what), what)


def format_assignment(assignment: dict[str, Precision]) -> dict[str, str]:
    """JSON form of an assignment: "w/a" strings."""
    return {name: str(as_precision(p)) for name, p in assignment.items()}
