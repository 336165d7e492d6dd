"""Every public name has a docstring example that runs when pasted into a fresh session.

``--doctest-modules`` runs the examples in the globals of the module that
defines them, where ``estimate`` or ``nn`` may already be imported; a reader
pasting an example has only what the example imports. So each example of
``lightning_meta.__all__`` (and of the public methods of its classes) runs
here in an empty namespace, as ``import torch, lightning_meta as lm`` would
start it.
"""

from __future__ import annotations

import doctest
import inspect

import pytest

import lightning_meta as lm


def _documented() -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for name in lm.__all__:
        obj = getattr(lm, name)
        out.append((name, obj))
        if inspect.isclass(obj):
            for attr in vars(obj):
                if not attr.startswith("_") or attr == "__call__":
                    out.append((f"{name}.{attr}", getattr(obj, attr)))
    return out


def _tests(name: str, obj: object) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(recurse=False)
    return [t for t in finder.find(obj, name, globs={}) if t.examples]


_WITH_EXAMPLES = [(n, o) for n, o in _documented() if _tests(n, o)]


def test_every_public_name_has_an_example() -> None:
    missing = [name for name in lm.__all__ if not _tests(name, getattr(lm, name))]
    assert missing == []


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize(("name", "obj"), _WITH_EXAMPLES, ids=[n for n, _ in _WITH_EXAMPLES])
def test_example_runs_in_a_fresh_namespace(name: str, obj: object) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report: list[str] = []
    for test in _tests(name, obj):
        test.globs = {}  # nothing the defining module imported
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)
