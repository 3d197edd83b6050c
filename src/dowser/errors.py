"""The one exception type for mistakes a user can fix (bad ratio, wrong file, mismatched model).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class DowserError(ValueError):
    """A user error: the message names the problem and the fix."""
