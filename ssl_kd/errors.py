"""Errors a user can fix, and how they are worded.

`UserError` is the one type the CLI turns into a one-line message with exit status 2 (a bad
command line, config, path or file). Anything else that escapes is a bug in ssl_kd and shows
its traceback (exit 1).
"""

from __future__ import annotations

from collections.abc import Sequence


class UserError(ValueError):
    """A problem in what the user asked for (a bad value, path or file); the message says what
    is wrong and how to fix it. A ValueError raised anywhere else is a bug, not this."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration problem: the message names the key and what would be valid."""


class RunFailed(UserError):
    """The run itself failed for a reason the user can act on (a non-finite loss, an unreadable
    image): one line, exit status 1, the last checkpoint kept."""

    exit_code = 1


class Terminated(RunFailed):
    """SIGTERM (a scheduler's notice before SIGKILL) stopped the run at a step boundary, after a
    final checkpoint: exit status 143 (128 + SIGTERM), as a process killed by it would give."""

    exit_code = 143


class Interrupted(UserError):
    """Ctrl-C (SIGINT): one line saying what is kept and how to go on, exit status 130 (the
    shell's 128 + SIGINT)."""

    exit_code = 130


class NonFiniteLoss(RunFailed, FloatingPointError):
    """The loss became NaN or Inf (train.on_nonfinite says what happens then)."""


def key_list(keys: Sequence[str], limit: int = 6, *, quoted: bool = False) -> str:
    """`a, b, c and 4 more` (`none` when empty): key lists in messages, cut to `limit` names.

    `quoted`: as a Python list, `['a', 'b', ... and 4 more]` (`[]` when empty).
    """
    if quoted:
        return f"[{key_list([repr(key) for key in keys], limit)}]" if keys else "[]"
    shown = ", ".join(str(key) for key in keys[:limit]) or "none"
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
