"""`bitmix simulate MODEL --bits B`: load a zoo model or a .pt2 program, capture, simulate, print, write JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bitmix.compiler.capture import capture
from bitmix.errors import BitmixError
from bitmix.ir.precision import chip_precision
from bitmix.simulator.api import simulate, uniform
from bitmix.simulator.config import load_chip_config
from bitmix.tools.models import load_model


def simulate_model_cli(model_spec: str, bits: str | int, config_path: str | None, engine: str, json_path: str | None,
                       input_shapes: list[tuple[int, ...]] | None = None) -> int:
    """Exit code 0 on success; user errors raise BitmixError for the CLI to print."""
    precision = chip_precision(bits, "--bits")
    chip = load_chip_config(config_path)
    loaded = load_model(model_spec, input_shapes)
    graph = capture(loaded.model, loaded.inputs, loaded.name)
    result = simulate(graph, uniform(graph, precision), chip, engine)
    result.print()
    if json_path:
        path = Path(json_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result.to_dict(), indent=2))
        except OSError as exc:
            raise BitmixError(f"cannot write --json {json_path!r} ({exc.strerror}); pick a writable path") from None
    return 0
