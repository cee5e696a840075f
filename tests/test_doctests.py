"""The examples in the public API's docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = ["mpx.policy._core", "mpx.policy._parsing", "mpx.policy._paths", "mpx._checks", "mpx._naming", "mpx.fp8._numerics",
           "mpx.fp8._meta", "mpx.fp8._saved", "mpx.int8._numerics", "mpx.loss_scale",
           "mpx.optim._adam", "mpx.optim._blocks",
           "mpx.nn._transformer"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name, globs=vars(module).copy()):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, "".join(report)
