"""Shared fixtures: captured zoo graphs (captured once per session) and hand-made layers."""

from __future__ import annotations

import pytest

from bitmix.ir.graph import Layer

_GRAPHS: dict = {}


@pytest.fixture(scope="session")
def zoo_graph():
    """`zoo_graph(name)` captures a zoo model once per test session."""

    def get(name: str):
        if name not in _GRAPHS:
            from bitmix import zoo
            from bitmix.compiler.capture import capture

            model, example_inputs, _ = zoo.load(name)
            _GRAPHS[name] = capture(model, example_inputs, name)
        return _GRAPHS[name]

    return get


def linear(name: str, k: int, n: int, rows: int = 128, batch: int = 1) -> Layer:
    return Layer(name, "linear", name, name, (n, k), (batch, rows, k), (batch, rows, n), batch * rows * k * n, k * n)


def conv(name: str, cin: int, cout: int, hw: int, kernel: int = 3, groups: int = 1, batch: int = 1) -> Layer:
    macs = batch * hw * hw * cout * (cin // groups) * kernel * kernel
    return Layer(name, "conv2d", name, name, (cout, cin // groups, kernel, kernel), (batch, cin, hw, hw),
                 (batch, cout, hw, hw), macs, cout * (cin // groups) * kernel * kernel,
                 padding=(kernel // 2, kernel // 2), groups=groups)


def llm_stack(d: int = 2560, ff: int = 10240, blocks: int = 36, vocab: int = 65536, rows: int = 128) -> list[Layer]:
    """A ~3 B-parameter decoder as Layer records (qkv, proj, up, down per block, then the LM head)."""
    layers = []
    for i in range(blocks):
        layers += [linear(f"b{i}.qkv", d, 3 * d, rows), linear(f"b{i}.proj", d, d, rows),
                   linear(f"b{i}.up", d, ff, rows), linear(f"b{i}.down", ff, d, rows)]
    return layers + [linear("lm_head", d, vocab, rows)]
