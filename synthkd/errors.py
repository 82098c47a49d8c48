"""One exception type for every user-facing mistake; the CLI turns it into exit code 2. And one
way to warn: a line on stderr that does not stop the run."""

import re
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


def unpickling_problem(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, as one line without torch's advice
    to retry with ``weights_only=False`` (which would run whatever code the file holds)."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    if "weights_only" not in text:
        return one_line(error)
    reason = re.search(r"WeightsUnpickler error: (.*?)(?: Please use| Check the documentation|$)", text)
    found = reason.group(1).strip() if reason else ""
    return one_line(f"it holds more than tensors and plain values: {found or 'something the safe loader refuses'}")
