"""Errors a user can fix, told apart from bugs.

`UserError` is a ValueError whose message names the setting or input and the way out; the
launch entry points print it as one line, without a traceback. Any other exception is a bug
(or an environment failure) and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad config value, input or environment the user can change; the message says how."""
