"""The bug catalogue of tools/mutation_check.py still plants into the current code: every
edit's text is in its file and the planted Python files compile. Running the mutation
check itself takes minutes per bug; this takes a second, so a kernel change that leaves an
entry behind fails here rather than when someone next runs the check."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_mutation_check():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mutation_check = load_mutation_check()
CATALOGUE = mutation_check.CATALOGUE


@pytest.mark.parametrize("bug", CATALOGUE, ids=lambda bug: bug.name)
def test_entry_plants_into_the_current_code(bug):
    original = (ROOT / bug.path).read_text()
    planted = mutation_check.planted_text(bug, original)
    for old, new in bug.edits:
        assert new in planted


def test_catalogue_names_families_and_tests():
    names = [bug.name for bug in CATALOGUE]
    assert len(set(names)) == len(names), "duplicate bug names"
    for bug in CATALOGUE:
        assert bug.family in mutation_check.FAMILY_TESTS, bug.name
        assert bug.name.startswith(f"{bug.family}/"), bug.name
    for files, _ in mutation_check.FAMILY_TESTS.values():
        for name in files:
            assert (ROOT / name).is_file(), name
    assert {bug.family for bug in CATALOGUE} == set(mutation_check.FAMILY_TESTS)


def test_stale_entries_are_refused():
    """The check above can fail: an edit whose text is gone, an edit that changes nothing,
    and a planted Python file that does not compile are each reported."""
    Bug = mutation_check.Bug
    text = "def f(x):\n    return x + 1\n"
    cases = {
        "no longer contains": Bug("triton/gone", "triton", "k.py", (("x - 1", "x + 2"),)),
        "unchanged": Bug("triton/same", "triton", "k.py", (("x + 1", "x + 1"),)),
        "does not compile": Bug("triton/syntax", "triton", "k.py", (("x + 1", "x +"),)),
    }
    for message, bug in cases.items():
        with pytest.raises(RuntimeError, match=message):
            mutation_check.planted_text(bug, text)
    planted = mutation_check.planted_text(Bug("triton/ok", "triton", "k.py", (("x + 1", "x + 2"),)), text)
    assert planted == "def f(x):\n    return x + 2\n"
