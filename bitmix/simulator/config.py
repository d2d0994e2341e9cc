"""Architecture description: the chip (cores, NoCs, memories, PCIe) and its energy table.

Defaults model IBM NorthPole. Every constant carries its source and tag from
`shared/reference/northpole_sim.md`: [V]/[V2] read in a primary or secondary
source, [D] derived (arithmetic shown), [A] an assumption where the sources are
silent (NF). Any field can be overridden from a TOML file; see `load_chip_config`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bitmix.errors import BitmixError
from bitmix.ir.precision import SUPPORTED_BITS, Precision, chip_precision

# Stillmaker & Baas (Integration 2017) energy scale factors evaluated with Accelergy's
# hwcomponents `scaling/techscaling.py` at 0.8 V [D, northpole_sim.md §3.1].
SCALE_45_TO_12 = 0.128
SCALE_65_TO_12 = 0.103

# MAC energy vs bit-width: E(b) = E(8) * (b/8)**alpha, alpha in [1, 2] between a packed-SIMD
# datapath (linear) and an ideal multiplier (quadratic) [D, northpole_sim.md §5]; midpoint taken.
MAC_BIT_EXPONENT = 1.5

# Horowitz ISSCC 2014, 45 nm: 8-bit multiply 0.2 pJ + 32-bit add 0.1 pJ = 0.3 pJ per int8 MAC
# with a 32-bit accumulator [V2]; x0.128 to 12 nm = 0.0384 pJ [D, §4.3].
_MAC8_PJ = (0.2 + 0.1) * SCALE_45_TO_12

# Eyeriss-like Timeloop reference (65 nm), fJ per compute for operand delivery:
# weights_spad 1006.69 + ifmap_spad 112.37 + psum_spad 386.77 = 1505.83 fJ [V, §3.1];
# x0.103 to 12 nm = 0.155 pJ per 8-bit lane word [D].
_REGFILE_PJ = (1006.69 + 112.37 + 386.77) * 1e-3 * SCALE_65_TO_12

# Horowitz 45 nm: 32 KB SRAM, 64-bit access 20 pJ = 0.3125 pJ/bit [V2]; x0.128 = 0.040 pJ/bit [D].
# A 768 KiB core memory is built from banks of this order; one figure serves read and write.
_SRAM_PJ_PER_BIT = 20.0 / 64 * SCALE_45_TO_12

# Eyeriss (Chen et al. ISCA 2016 Table IV): inter-PE hop = 2x an 8-bit MAC (0.2077 pJ, 65 nm
# Accelergy ERT) for a 16-bit word = 0.026 pJ/bit at 65 nm [V2]; x0.103 to 12 nm = 0.0027 pJ/bit.
# NorthPole cores are ~6.5x further apart (sqrt(800 mm^2/256) = 1.77 mm [D from V2 die area] vs
# ~0.27 mm Eyeriss PE pitch [A: 168 PEs in ~12 mm^2, Chen JSSC 2017 die, not in the shared notes])
# and wire energy grows with length: 0.0027 * 6.5 = 0.0175 pJ/bit/hop [D].
_NOC_PJ_PER_BIT_HOP = 2 * 0.2077 / 16 * SCALE_65_TO_12 * (1.77 / 0.27)

# Horowitz 45 nm FP16 add 0.4 pJ + FP16 multiply 1.1 pJ = one FP16 multiply-add [V2];
# x0.128 = 0.192 pJ per vector op [D].
_VECTOR_OP_PJ = (0.4 + 1.1) * SCALE_45_TO_12

# PCIe Gen4 SerDes + controller energy per bit moved between cards: NF in the shared notes;
# 5 pJ/bit is a typical published long-reach SerDes figure [A].
_PCIE_PJ_PER_BIT = 5.0


@dataclass(frozen=True)
class EnergyRow:
    """One Accelergy-style energy-reference-table row: energy of one action of one component."""

    component: str  # "mac", "regfile", "sram", "noc_psum", "noc_act", "noc_model", "noc_instr", ...
    action: str  # "compute", "access", "read", "write", "hop", "op", "transfer"
    bits: int  # operand width the row applies to; 1 = per bit moved/stored
    node_nm: int
    energy_pj: float
    source: str


def _mac_row(bits: int) -> EnergyRow:
    return EnergyRow(
        "mac", "compute", bits, 12, _MAC8_PJ * (bits / 8) ** MAC_BIT_EXPONENT,
        "Horowitz ISSCC'14 int8 mult 0.2 pJ + int32 add 0.1 pJ (45 nm) x0.128 to 12 nm "
        f"(Stillmaker&Baas); x(b/8)^{MAC_BIT_EXPONENT} for b<8 (northpole_sim.md §5) [D]",
    )


def _noc_row(component: str) -> EnergyRow:
    return EnergyRow(
        component, "hop", 1, 12, _NOC_PJ_PER_BIT_HOP,
        "Eyeriss ISCA'16 Tab.IV inter-PE = 2x MAC (0.2077 pJ, 65 nm) per 16 bits, x0.103 to 12 nm, "
        "x6.5 for the 1.77 mm NorthPole core pitch vs ~0.27 mm Eyeriss PE pitch [D/A]",
    )


DEFAULT_ENERGY_ROWS: tuple[EnergyRow, ...] = (
    _mac_row(8),
    _mac_row(4),
    _mac_row(2),
    EnergyRow(
        "regfile", "access", 8, 12, _REGFILE_PJ,
        "Timeloop/Accelergy Eyeriss-like ref. output fJ/compute: weights_spad 1006.69 + ifmap_spad "
        "112.37 + psum_spad 386.77 (65 nm) x0.103 to 12 nm; per 8-bit lane word [D]",
    ),
    EnergyRow("sram", "read", 1, 12, _SRAM_PJ_PER_BIT,
              "Horowitz ISSCC'14 32 KB SRAM 20 pJ per 64-bit access (45 nm) x0.128 to 12 nm [D]"),
    EnergyRow("sram", "write", 1, 12, _SRAM_PJ_PER_BIT,
              "Horowitz ISSCC'14 32 KB SRAM 20 pJ per 64-bit access (45 nm) x0.128 to 12 nm [D]"),
    _noc_row("noc_psum"),
    _noc_row("noc_act"),
    _noc_row("noc_model"),
    _noc_row("noc_instr"),
    EnergyRow("vector", "op", 16, 12, _VECTOR_OP_PJ,
              "Horowitz ISSCC'14 FP16 add 0.4 pJ + FP16 mult 1.1 pJ (45 nm) x0.128 to 12 nm [D]"),
    EnergyRow("pcie", "transfer", 1, 12, _PCIE_PJ_PER_BIT,
              "PCIe Gen4 SerDes energy per bit: not in the shared notes (NF); typical published value [A]"),
)

# Static power: leakage of 22 B transistors, clock tree and the 8 always-on control threads per
# core, which burn whether or not the MACs are busy. NorthPole's per-component power split is NF,
# so this is the one energy constant fitted, once: NorthPole draws 74 W at 42,460 ResNet-50 int8
# frames/s (Science 2023 Table 1 [V2]). This table's dynamic terms give 1.34 mJ per ResNet-50 int8
# frame, i.e. 1.34 mJ x 42,460 fps = 57 W at the published rate; 74 - 57 = 17 W static [D].
DEFAULT_STATIC_POWER_W = 17.0


@dataclass(frozen=True)
class EnergyTable:
    """Energy-reference table plus static power; `lookup` picks the row for an action."""

    rows: tuple[EnergyRow, ...] = DEFAULT_ENERGY_ROWS
    static_power_w: float = DEFAULT_STATIC_POWER_W

    def lookup(self, component: str, action: str, bits: int = 1) -> float:
        """Energy in joules of one action; falls back to the row with the nearest width."""
        matches = [r for r in self.rows if r.component == component and r.action == action]
        if not matches:
            raise BitmixError(
                f"energy table has no row for component={component!r} action={action!r}; "
                "add one under [[energy.rows]] in the chip config"
            )
        row = min(matches, key=lambda r: (abs(r.bits - bits), -r.bits))
        return row.energy_pj * 1e-12


@dataclass(frozen=True)
class NocConfig:
    """One network-on-chip: link width per core per cycle and per-hop latency."""

    width_bits: int
    hop_cycles: int = 1


@dataclass(frozen=True)
class PcieConfig:
    """The chip-to-chip link used by multi-chip pipelines."""

    bandwidth_bytes_s: float = 16e9 * 16 * 128 / 130 / 8  # Gen4 x16: 16 GT/s x 16 lanes, 128b/130b [A]
    latency_s: float = 1e-6  # DMA + switch traversal per transfer [A]


@dataclass(frozen=True)
class ChipConfig:
    """A NorthPole-style chip. Field comments give source and tag."""

    name: str = "northpole"
    cores_x: int = 16  # 16x16 core array [V2, Science 2023 Axiom 3]
    cores_y: int = 16
    clock_hz: float = 400e6  # 400 MHz [V2, Ottati blog]
    ops_per_cycle_int8: int = 2048  # per core [V2, Science 2023]
    ops_per_cycle_int4: int = 4096
    ops_per_cycle_int2: int = 8192
    # ResNet-50 is 4.09 GMAC; 42,460 fps x 4.09 GMAC = 1.74e14 MAC/s, which fits the 2.1e14 ops/s
    # int8 peak only if one op is one MAC [D, §1.1]. Set 2 to count multiply and add separately.
    ops_per_mac: float = 1.0
    # MAC array shape: output-channel lanes per core; the reduction lanes are the rest of the
    # MACs/cycle (64 at int8) and widen with lower precision, as 4-bit and 2-bit operands are
    # SIMD-packed into 8-bit words along the reduction (Ottati's reading, §5) [A].
    mac_out_lanes: int = 32
    core_sram_bytes: int = 768 * 1024  # 768 KiB per core [V2]
    framebuffer_bytes: int = 32 * 1024 * 1024  # 32 MiB I/O frame buffer [V2]
    psum_bits: int = 32  # int32 partial sums, as the bitmix kernels accumulate [A]
    # Program per core per layer: ~64 64-bit instructions for the 8 threads [A]; loaded over the
    # Instruction NoC while the previous layer runs ("present on each core before use", Axiom 9).
    program_bytes_per_layer: int = 512
    # Vector unit: FP16 multiply-adds per core per cycle; sized so one requantize + one residual
    # add per output keeps pace with the 32 outputs/cycle of a one-pass layer [A].
    vector_ops_per_cycle: int = 64
    mac_latency_cycles: int = 4  # MAC array pipeline depth [A]
    vector_latency_cycles: int = 4  # vector unit pipeline depth [A]
    # Rows (output pixels/tokens) per pipelined block, set by the accumulator file: 8 rows x 32
    # lanes x int32 = 1 KiB [A]. Activations arrive, are multiplied and leave in such blocks,
    # and the MAC array reloads its weight block from SRAM once per block.
    pipeline_rows: int = 8
    # NoC widths: the four NoCs share the ">4096 wires crossing each core both horizontally and
    # vertically" [V2, Science]; the split is NF [A]. One hop = one core pitch per cycle [A].
    noc_psum: NocConfig = field(default_factory=lambda: NocConfig(1024, 1))
    noc_act: NocConfig = field(default_factory=lambda: NocConfig(1024, 1))
    noc_model: NocConfig = field(default_factory=lambda: NocConfig(512, 1))
    noc_instr: NocConfig = field(default_factory=lambda: NocConfig(256, 1))
    pcie: PcieConfig = field(default_factory=PcieConfig)
    energy: EnergyTable = field(default_factory=EnergyTable)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def cores(self) -> int:
        return self.cores_x * self.cores_y

    def ops_per_cycle(self, bits: int | Precision) -> int:
        """Ops per core per cycle in the MAC mode of `bits` (a pair runs at its wider operand's rate)."""
        bits = bits.compute if isinstance(bits, Precision) else bits
        check_bits(bits)
        return {8: self.ops_per_cycle_int8, 4: self.ops_per_cycle_int4, 2: self.ops_per_cycle_int2}[bits]

    def macs_per_cycle(self, bits: int | Precision) -> float:
        """MACs one core retires per cycle at `bits`."""
        return self.ops_per_cycle(bits) / self.ops_per_mac

    def red_lanes(self, bits: int | Precision) -> int:
        """Reduction lanes of the MAC array at `bits` (the other dimension is `mac_out_lanes`)."""
        return max(1, int(self.macs_per_cycle(bits) // self.mac_out_lanes))

    @property
    def sram_bytes(self) -> int:
        return self.cores * self.core_sram_bytes

    @property
    def mean_hops(self) -> float:
        """Mean Manhattan distance between two uniformly chosen cores of the mesh."""
        return (self.cores_x**2 - 1) / (3 * self.cores_x) + (self.cores_y**2 - 1) / (3 * self.cores_y)

    @property
    def diameter_hops(self) -> int:
        return self.cores_x - 1 + self.cores_y - 1


def check_bits(bits: int | Precision) -> None:
    if isinstance(bits, Precision):
        chip_precision(bits)
        return
    if bits not in SUPPORTED_BITS:
        raise BitmixError(f"unknown precision {bits!r}; bits must be one of 8, 4, 2")


# Allowed ranges: (min, max) inclusive; checked on every ChipConfig built, defaults included.
_RANGES: dict[str, tuple[float, float]] = {
    "cores_x": (1, 1024),
    "cores_y": (1, 1024),
    "clock_hz": (1e6, 1e10),
    "ops_per_cycle_int8": (1, 2**24),
    "ops_per_cycle_int4": (1, 2**24),
    "ops_per_cycle_int2": (1, 2**24),
    "ops_per_mac": (0.25, 8),
    "mac_out_lanes": (1, 2**16),
    "core_sram_bytes": (1024, 2**34),
    "framebuffer_bytes": (0, 2**40),
    "psum_bits": (8, 64),
    "program_bytes_per_layer": (0, 2**24),
    "vector_ops_per_cycle": (1, 2**20),
    "mac_latency_cycles": (0, 10_000),
    "vector_latency_cycles": (0, 10_000),
    "pipeline_rows": (1, 2**20),
}
_NOC_RANGES = {"width_bits": (1, 2**20), "hop_cycles": (0, 1000)}
_PCIE_RANGES = {"bandwidth_bytes_s": (1e6, 1e13), "latency_s": (0.0, 1.0)}
_ENERGY_RANGES = {"static_power_w": (0.0, 1e5)}


def _check_range(where: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BitmixError(f"chip config: {where} must be a number in [{lo:g}, {hi:g}], got {value!r}")
    if not lo <= value <= hi:
        raise BitmixError(f"chip config: {where} = {value:g} is out of range; allowed [{lo:g}, {hi:g}]")


def _validate(cfg: ChipConfig) -> None:
    for name, (lo, hi) in _RANGES.items():
        _check_range(name, getattr(cfg, name), lo, hi)
    for noc in ("noc_psum", "noc_act", "noc_model", "noc_instr"):
        for name, (lo, hi) in _NOC_RANGES.items():
            _check_range(f"{noc}.{name}", getattr(getattr(cfg, noc), name), lo, hi)
    for name, (lo, hi) in _PCIE_RANGES.items():
        _check_range(f"pcie.{name}", getattr(cfg.pcie, name), lo, hi)
    _check_range("energy.static_power_w", cfg.energy.static_power_w, *_ENERGY_RANGES["static_power_w"])
    for row in cfg.energy.rows:
        _check_range(f"energy.rows[{row.component}/{row.action}].energy_pj", row.energy_pj, 0.0, 1e6)
    if cfg.energy.static_power_w == 0 and all(row.energy_pj == 0 for row in cfg.energy.rows):
        raise BitmixError("chip config: every energy is 0 (static_power_w and all [[energy.rows]]), so a frame costs "
                          "no energy and fps/W is infinite; give the chip's energies (see the default table's sources)")
    if cfg.red_lanes(8) * cfg.mac_out_lanes > cfg.macs_per_cycle(8) + 1e-9 or cfg.macs_per_cycle(8) < 1:
        raise BitmixError(
            f"chip config: mac_out_lanes = {cfg.mac_out_lanes} exceeds the int8 MACs per cycle "
            f"({cfg.macs_per_cycle(8):g}); allowed [1, ops_per_cycle_int8 / ops_per_mac]"
        )


_SECTIONS = {"chip", "noc", "pcie", "energy"}


def load_chip_config(path: str | None) -> ChipConfig:
    """NorthPole defaults, overridden by a TOML file's [chip], [noc.*], [pcie] and [energy] tables.

    Example::

        [chip]
        clock_hz = 200e6
        [noc.act]
        width_bits = 2048
        [energy]
        static_power_w = 20
        [[energy.rows]]  # replaces the default row with the same component/action/bits
        component = "sram"; action = "read"; bits = 1; node_nm = 7; energy_pj = 0.02; source = "..."
    """
    if path is None:
        return ChipConfig()
    p = Path(path)
    if not p.is_file():
        raise BitmixError(f"chip config file {path!r} not found; pass the path of an existing TOML file")
    try:
        text = p.read_text(encoding="utf-8")  # TOML is UTF-8 whatever the locale
    except UnicodeDecodeError as exc:
        raise BitmixError(f"chip config {path!r} is not a text TOML file ({exc.reason} at byte {exc.start}); "
                          "pass a UTF-8 TOML file with [chip], [noc.*], [pcie] or [energy] tables") from None
    except OSError as exc:
        raise BitmixError(f"cannot read chip config {path!r} ({exc.strerror or exc}); pass a readable file") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BitmixError(f"chip config {path!r} is not valid TOML ({exc}); fix the syntax") from None
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> ChipConfig:
    """Apply a parsed TOML document to the defaults, naming any unknown or ill-typed field."""
    unknown = set(data) - _SECTIONS
    if unknown:
        raise BitmixError(f"chip config: unknown section {sorted(unknown)[0]!r}; allowed: {sorted(_SECTIONS)}")
    defaults = {f.name: getattr(ChipConfig(), f.name) for f in fields(ChipConfig)}
    chip = dict(defaults)
    scalar = {k for k in _RANGES} | {"name"}
    for key, value in _table("chip", data.get("chip", {})).items():
        if key not in scalar:
            raise BitmixError(f"chip config: unknown field chip.{key}; allowed: {', '.join(sorted(scalar))}")
        chip[key] = _typed(f"chip.{key}", value, type(defaults[key]))
    for noc_name, table in _table("noc", data.get("noc", {})).items():
        key = f"noc_{noc_name}"
        if key not in defaults:
            raise BitmixError(f"chip config: unknown NoC noc.{noc_name}; allowed: psum, act, model, instr")
        chip[key] = _override(f"noc.{noc_name}", defaults[key], _table(f"noc.{noc_name}", table))
    chip["pcie"] = _override("pcie", defaults["pcie"], _table("pcie", data.get("pcie", {})))
    energy = dict(_table("energy", data.get("energy", {})))
    rows = energy.pop("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BitmixError(f"chip config: energy.rows must be an array of tables ([[energy.rows]] blocks), "
                          f"got {rows!r}")
    rows = _merge_rows(rows, defaults["energy"].rows)
    table = _override("energy", defaults["energy"], energy)
    chip["energy"] = replace(table, rows=rows)
    return ChipConfig(**chip)


def _table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BitmixError(f"chip config: {where} must be a table (a [{where}] header over key = value lines), "
                          f"got {value!r}")
    return value


def _typed(where: str, value: Any, kind: type) -> Any:
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BitmixError(f"chip config: {where} must be a {kind.__name__}, got {value!r}")
    return value


def _override(where: str, obj: Any, table: dict[str, Any]) -> Any:
    allowed = {f.name: type(getattr(obj, f.name)) for f in fields(obj) if f.name != "rows"}
    changes = {}
    for key, value in table.items():
        if key not in allowed:
            raise BitmixError(f"chip config: unknown field {where}.{key}; allowed: {', '.join(sorted(allowed))}")
        changes[key] = _typed(f"{where}.{key}", value, allowed[key])
    return replace(obj, **changes)


def _merge_rows(new_rows: list[dict[str, Any]], rows: tuple[EnergyRow, ...]) -> tuple[EnergyRow, ...]:
    merged = list(rows)
    names = [f.name for f in fields(EnergyRow)]
    for i, raw in enumerate(new_rows):
        missing = [n for n in names if n not in raw]
        extra = [k for k in raw if k not in names]
        if missing or extra:
            bad = missing[0] if missing else extra[0]
            raise BitmixError(
                f"chip config: energy.rows[{i}] {'lacks' if missing else 'has unknown'} field {bad!r}; "
                f"each row needs exactly {', '.join(names)}"
            )
        row = EnergyRow(**{n: _typed(f"energy.rows[{i}].{n}", raw[n], type(getattr(rows[0], n))) for n in names})
        known = sorted({f"{r.component}/{r.action}" for r in rows})
        if f"{row.component}/{row.action}" not in known:
            raise BitmixError(f"chip config: energy.rows[{i}] prices {row.component}/{row.action}, which the "
                              f"simulator never charges; component/action is one of {', '.join(known)}")
        merged = [r for r in merged if (r.component, r.action, r.bits) != (row.component, row.action, row.bits)]
        merged.append(row)
    return tuple(merged)
