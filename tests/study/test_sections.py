"""Per-model notes on the results page: what a reduced run says it left out."""

from __future__ import annotations

from dataclasses import asdict

from bitmix.study.config import default_config
from bitmix.study.sections import scope_note


def _note(study: str) -> str | None:
    return scope_note({"model": study, "config": asdict(default_config(study, quick=True))})


def test_quick_ptq_study_does_not_claim_a_fine_tune_epoch():
    """A -ptq study fine-tunes nothing, with or without --quick."""
    assert _note("digits-cnn-ptq").startswith("reduced run: `--quick` (1 seed);")


def test_quick_study_names_its_one_fine_tune_epoch():
    assert _note("digits-cnn").startswith("reduced run: `--quick` (1 seed, 1 fine-tune epoch);")
