"""A refusal of bad input: its own exception type, raised on purpose.

A stage (or a script) raises `Refusal` where the user's input, files or settings cannot be used:
its message names the file, row or value and the fix. `stage.cli` prints it as one line,
`<stage>: <message>`, and exits 2, before or instead of any expensive work; everything else is
a bug and keeps its traceback. The subclasses keep the built-in type a caller may catch
(`except FileNotFoundError`) beside it.
"""
from __future__ import annotations


class Refusal(ValueError):
    """Bad input, refused with a message that names it and the fix."""


class MissingInput(Refusal, FileNotFoundError):
    """A file or folder the stage needs is not there."""


class OutputExists(Refusal, FileExistsError):
    """An output would overwrite something that is not ours to replace."""


class NotAllowed(Refusal, PermissionError):
    """A folder the stage must write is not writable."""


class BadState(Refusal, RuntimeError):
    """A run's state (a lock, a checkpoint, a diverged loss) stops it, with what to do."""


class MissingKey(Refusal, KeyError):
    """A name the input should hold is not in it."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0]) if self.args else ""
