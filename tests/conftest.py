"""Shared fixtures: zoo models and captured graphs are built once per test session."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("BITMIX_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@functools.cache
def zoo_entry(name: str):
    from bitmix import zoo

    return zoo.load(name)


@functools.cache
def captured(name: str):
    from bitmix.compiler.capture import capture

    model, inputs, _ = zoo_entry(name)
    return capture(model, inputs, name)


@pytest.fixture
def load_zoo():
    return zoo_entry


@pytest.fixture
def capture_zoo():
    return captured
