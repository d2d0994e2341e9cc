"""`bitmix simulate MODEL --bits B`: load a zoo model, capture, simulate, print, write JSON."""

from __future__ import annotations

import json
from pathlib import Path

from bitmix.errors import BitmixError
from bitmix.simulator.config import check_bits, load_chip_config


def simulate_model_cli(model_name: str, bits: int, config_path: str | None, engine: str,
                       json_path: str | None) -> int:
    """Exit code 0 on success; user errors raise BitmixError for the CLI to print."""
    from bitmix import zoo
    from bitmix.compiler.capture import capture
    from bitmix.simulator.api import simulate, uniform

    check_bits(bits)
    chip = load_chip_config(config_path)
    model, example_inputs, _ = zoo.load(model_name)
    graph = capture(model, example_inputs, model_name)
    result = simulate(graph, uniform(graph, bits), chip, engine)
    result.print()
    if json_path:
        path = Path(json_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result.to_dict(), indent=2))
        except OSError as exc:
            raise BitmixError(f"cannot write --json {json_path!r} ({exc.strerror}); pick a writable path") from None
    return 0
