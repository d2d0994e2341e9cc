"""`--executor` / `--ray-address` on `compile` and `study frontier`: bad input is one line, exit 2."""

from __future__ import annotations

import socket
import sys

import pytest

from bitmix.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: nothing listens there


def _one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitmix: error: ") and message in err, err


@pytest.mark.parametrize("command", [["compile", "digits-mlp", "--out", "x"],
                                     ["study", "frontier", "digits-mlp", "--quick", "--out", "x"]])
def test_unreachable_ray_address(capsys, command):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_closed_port()}"
    _one_line_error(capsys, [*command, "--executor", "ray", "--ray-address", address],
                    f"cannot reach the Ray cluster at {address}")
    _one_line_error(capsys, [*command, "--ray-address", "no-port"], "must be host:port")
    _one_line_error(capsys, [*command, "--executor", "local", "--ray-address", address], "needs --executor ray")


def test_ray_not_installed(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    _one_line_error(capsys, ["compile", "digits-mlp", "--executor", "ray", "--out", "x"], "pip install ray")
    _one_line_error(capsys, ["study", "frontier", "digits-mlp", "--quick", "--executor", "ray", "--out", "x"],
                    "pip install ray")
