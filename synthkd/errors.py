"""One exception type for every user-facing mistake; the CLI turns it into exit code 2. And one
way to warn: a line on stderr that does not stop the run."""

import sys


class SynthkdError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


def warn(message: str) -> None:
    """Tell the user about something recovered from (a corrupt file redone, a mismatch tolerated)."""
    print(f"synthkd: warning: {message}", file=sys.stderr, flush=True)
