"""Whose error is it: the user's input, or ours.

`UserError` is bad input from the user — an option, a path, a file's content, a data set, a model
directory, an argument of the documented Python API — and its message says the fix. Every command-line
entry point prints a UserError's message and exits 2, without a traceback. Anything else raised inside
m2pt_fast (a plain ValueError, RuntimeError, AssertionError, ...) is ours, a bug or a state that should
be impossible, and keeps its traceback.

UserError is a ValueError, and `MissingInput` (a path that is not there) a FileNotFoundError too, so code
that caught those before still does.
"""


class UserError(ValueError):
    """Bad input from the user; the message says what to change."""


class MissingInput(UserError, FileNotFoundError):
    """A file or directory the user named is not there (or lacks what it must hold)."""
