"""One exception type for every user-facing mistake; the CLI turns it into exit code 2. And one
way to warn: a line on stderr that does not stop the run."""

import sys


class SynthkdError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""


def warn(message: str) -> None:
    """Tell the user about something recovered from (a corrupt file redone, a mismatch tolerated)."""
    print(f"synthkd: warning: {message}", file=sys.stderr, flush=True)


def one_line(error: BaseException | str, limit: int = 240) -> str:
    """A library's message (often several lines of PyTorch text) as one short line to quote in ours."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
