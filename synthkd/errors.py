"""One exception type for every user-facing mistake; the CLI turns it into exit code 2."""


class SynthkdError(Exception):
    """A problem with the user's input: the message names it and says how to fix it."""
