"""The one error type for a user's mistake: the CLI prints its message as one line and exits 2.

Anything else that escapes a command is a bug in lipcli or a library and is shown as one (exit 1).
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a file, flag, config field or path the user can fix; the message says how."""
