"""The exception of bad input: what a user can fix (a data file, a row, a flag, a model path), as opposed to a bug."""

from __future__ import annotations


__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input that the user can fix. The message names what is wrong (the file or dataset, the row, the column or
    the flag) and the fix, on one line. The command line prints it as its last line, without a traceback."""
