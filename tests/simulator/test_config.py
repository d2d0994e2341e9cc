import pytest

from bitmix.errors import BitmixError
from bitmix.simulator.config import ChipConfig, EnergyTable, load_chip_config


def test_northpole_defaults():
    chip = load_chip_config(None)
    assert chip.cores == 256 and chip.clock_hz == 400e6
    assert [chip.ops_per_cycle(b) for b in (8, 4, 2)] == [2048, 4096, 8192]
    assert chip.sram_bytes == 192 * 2**20 and chip.framebuffer_bytes == 32 * 2**20


def test_every_energy_row_has_a_source():
    for row in EnergyTable().rows:
        assert row.source and row.energy_pj > 0 and row.node_nm == 12


def test_mac_energy_falls_with_bits():
    t = EnergyTable()
    assert t.lookup("mac", "compute", 8) > t.lookup("mac", "compute", 4) > t.lookup("mac", "compute", 2)


def test_toml_overrides(tmp_path):
    path = tmp_path / "chip.toml"
    path.write_text(
        '[chip]\nclock_hz = 200e6\ncores_x = 8\n[noc.act]\nwidth_bits = 2048\n[energy]\nstatic_power_w = 5\n'
        '[[energy.rows]]\ncomponent = "sram"\naction = "read"\nbits = 1\nnode_nm = 7\nenergy_pj = 0.02\n'
        'source = "test"\n'
    )
    chip = load_chip_config(str(path))
    assert chip.clock_hz == 200e6 and chip.cores == 8 * 16 and chip.noc_act.width_bits == 2048
    assert chip.energy.static_power_w == 5.0
    assert chip.energy.lookup("sram", "read") == pytest.approx(0.02e-12, rel=1e-9, abs=0)
    assert chip.energy.lookup("sram", "write") != pytest.approx(0.02e-12, rel=1e-9, abs=0)


@pytest.mark.parametrize(
    "toml, field",
    [
        ("[chip]\nclock_hz = -4e8\n", "clock_hz"),
        ("[chip]\ncores_x = 0\n", "cores_x"),
        ("[chip]\ncore_sram_bytes = 10\n", "core_sram_bytes"),
        ("[chip]\nwarp_drive = 1\n", "chip.warp_drive"),
        ("[noc.act]\nwidth_bits = 0\n", "noc_act.width_bits"),
        ("[noc.hyper]\nwidth_bits = 8\n", "noc.hyper"),
        ("[chip]\nclock_hz = \"fast\"\n", "chip.clock_hz"),
        ("[energy]\nstatic_power_w = -1\n", "energy.static_power_w"),
        ("[[energy.rows]]\ncomponent = \"mac\"\n", "energy.rows[0]"),
        ("[chip]\nmac_out_lanes = 4096\n", "mac_out_lanes"),
        ("chip = 5\n", "chip must be a table"),
        ("noc = 5\n", "noc must be a table"),
        ("[noc]\nact = 5\n", "noc.act must be a table"),
        ("pcie = \"fast\"\n", "pcie must be a table"),
        ("energy = 3\n", "energy must be a table"),
        ("[energy]\nrows = 5\n", "energy.rows must be an array of tables"),
        ("[energy]\nrows = [1, 2]\n", "energy.rows must be an array of tables"),
        ("[[energy.rows]]\ncomponent = \"sram\"\naction = \"fly\"\nbits = 1\nnode_nm = 7\nenergy_pj = 0.1\n"
         "source = \"x\"\n", "sram/fly, which the simulator never charges"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, toml, field):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(BitmixError) as err:
        load_chip_config(str(path))
    message = str(err.value)
    assert field in message and "\n" not in message


def test_a_chip_whose_every_energy_is_zero_is_refused(tmp_path):
    """A frame at zero energy has infinite fps/W: the simulator divided by zero (CLI: "internal error")."""
    rows = "".join(f'[[energy.rows]]\ncomponent = "{r.component}"\naction = "{r.action}"\nbits = {r.bits}\n'
                   f'node_nm = {r.node_nm}\nenergy_pj = 0.0\nsource = "test"\n' for r in ChipConfig().energy.rows)
    path = tmp_path / "zero.toml"
    path.write_text("[energy]\nstatic_power_w = 0\n" + rows)
    with pytest.raises(BitmixError, match="every energy is 0 .*fps/W is infinite"):
        load_chip_config(str(path))
    path.write_text("[energy]\nstatic_power_w = 1\n" + rows)
    assert load_chip_config(str(path)).energy.static_power_w == 1.0


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(BitmixError, match="not found"):
        load_chip_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[chip\n")
    with pytest.raises(BitmixError, match="not valid TOML"):
        load_chip_config(str(bad))


def test_binary_file_is_one_line_error(tmp_path):
    binary = tmp_path / "chip.toml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(BitmixError, match="is not a text TOML file") as err:
        load_chip_config(str(binary))
    assert "\n" not in str(err.value)


def test_unknown_precision():
    with pytest.raises(BitmixError, match="bits must be one of 8, 4, 2"):
        ChipConfig().ops_per_cycle(3)
