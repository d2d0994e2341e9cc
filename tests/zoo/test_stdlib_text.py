"""The stdlib text split: whole modules go to one side, every fifth (sorted) to the test text."""

from __future__ import annotations

from bitmix.zoo import stdlib_text


def test_split_is_by_module(monkeypatch):
    fake = {f"mod{i:02d}": [f"sentence {j} of module {i}" for j in range(3)] for i in range(10)}
    monkeypatch.setattr(stdlib_text, "sentences_by_module", lambda: fake)
    train, test = stdlib_text.split_sentences()
    assert len(train) == 24 and len(test) == 6
    assert {s.split()[-1] for s in test} == {"4", "9"}  # modules 4 and 9 of 0..9
    assert not {s.split()[-1] for s in train} & {"4", "9"}


def test_paragraph_keeps_the_first_paragraph_within_length():
    doc = "Return the thing\n    that you asked for, nicely.\n\nMore detail that is not part of it."
    assert stdlib_text._paragraph(doc) == "Return the thing that you asked for, nicely."
    assert stdlib_text._paragraph("Too short.") is None
    assert stdlib_text._paragraph(None) is None
