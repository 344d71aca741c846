"""A refusal is a type (recipes.lib.errors.Refusal), not a source line: stage.cli prints any
Refusal as one line with exit 2, however deep the helper that raised it, and lets every other
exception, ours or upstream's, keep its traceback."""
import pytest

from recipes.lib import errors, stage
from recipes.lib.config import ConfigError
from recipes.lib.documents import BadRow


def helper(kind):
    def deeper():
        if kind == "refusal":
            raise errors.MissingInput("data.input=/x does not exist: give a folder")
        if kind == "made":  # a refusal built by one helper and raised by another
            err = errors.Refusal("row 3: not JSON; fix it or set data.on_bad_row=skip")
            raise err
        if kind == "bug":
            return int("not a number")  # a ValueError, but not raised on purpose
        raise ValueError("an upstream-style ValueError")
    return deeper()


def test_a_refusal_raised_through_helpers_is_one_line(capsys):
    assert stage.cli(lambda: helper("refusal"), "data") == stage.EXIT_REFUSED
    assert capsys.readouterr().err == "data: data.input=/x does not exist: give a folder\n"
    assert stage.cli(lambda: helper("made"), "data") == stage.EXIT_REFUSED
    assert "row 3: not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["bug", "plain"])
def test_anything_else_keeps_its_traceback(kind):
    with pytest.raises(ValueError):
        stage.cli(lambda: helper(kind), "data")


def test_refusals_keep_the_builtin_type_callers_catch():
    assert issubclass(errors.MissingInput, FileNotFoundError)
    assert issubclass(errors.OutputExists, FileExistsError)
    assert issubclass(errors.BadState, RuntimeError) and issubclass(errors.NotAllowed, OSError)
    for cls in (ConfigError, BadRow, errors.MissingKey):
        assert issubclass(cls, errors.Refusal)
    assert str(errors.MissingKey("no 'arch' in manifest.json")) == "no 'arch' in manifest.json"
