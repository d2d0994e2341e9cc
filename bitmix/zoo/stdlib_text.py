"""English sentences from the Python standard library's docstrings, split by module.

Every machine that runs bitmix has the standard library, so this is real text that needs no
download. The split is by top-level module (every fifth module, in sorted order, is test text),
so no test sentence comes from a module the model was calibrated or fine-tuned on.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pkgutil
import sys
import warnings

MIN_CHARS, MAX_CHARS = 40, 400  # a sentence-length paragraph; longer ones are truncated by the tokenizer anyway
TEST_EVERY = 5
# Importing these opens windows or a browser, prints, or needs a platform this is not.
SIDE_EFFECTS = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "pydoc",
    "msilib", "winreg", "winsound", "msvcrt", "nturl2path", "lib2to3", "webbrowser", "pdb", "code", "site",
})
SKIP_PARTS = frozenset({"__main__", "test", "tests", "idle_test"})


def _modules() -> list[str]:
    """Public stdlib modules and their direct submodules, sorted (deterministic)."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SIDE_EFFECTS or top in SKIP_PARTS:
            continue
        names.append(top)
        spec = importlib.util.find_spec(top) if _safe_spec(top) else None
        if spec is not None and spec.submodule_search_locations:
            names += sorted(f"{top}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)
                            if not m.name.startswith("_") and m.name not in SKIP_PARTS)
    return names


def _safe_spec(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _paragraph(doc: object) -> str | None:
    if not isinstance(doc, str):
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    return para if MIN_CHARS <= len(para) <= MAX_CHARS else None


def sentences_by_module() -> dict[str, list[str]]:
    """Top-level module -> its first docstring paragraphs (module, public objects), each sentence once overall."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name in _modules():
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module that cannot import here (platform, optional C library) is skipped
            continue
        objects = [module] + [getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")]
        for obj in objects:
            para = _paragraph(getattr(obj, "__doc__", None))
            if para is not None and para not in seen:
                seen.add(para)
                out.setdefault(name.split(".")[0], []).append(para)
    return out


def split_sentences() -> tuple[list[str], list[str]]:
    """(train, test): every TEST_EVERY-th top-level module's sentences are the test text."""
    by_module = sentences_by_module()
    train: list[str] = []
    test: list[str] = []
    for i, module in enumerate(sorted(by_module)):
        (test if i % TEST_EVERY == TEST_EVERY - 1 else train).extend(by_module[module])
    return train, test
