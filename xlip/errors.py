"""xlip's one exception family.

Every fault a user can cause and fix (a bad flag or config key, a missing or corrupt file, a
malformed manifest row, a diverged run) raises an ``XlipError`` whose message names the file,
row or key and the fix. The ``xlip`` command prints it as one line and exits with status 2; any
other exception is a bug and keeps its traceback.
"""


class XlipError(Exception):
    """A fault in the user's input, config or environment, with a message that says the fix."""


class InputError(XlipError, ValueError):
    """A bad value in a file or argument the user gave."""


class MissingFileError(XlipError, FileNotFoundError):
    """A file or folder the user named (or the config points to) does not exist."""
