"""One exception type for bad input: the CLI turns it into a one-line message and exit code 2."""


class GradsimError(Exception):
    """A user-facing problem: the message names what is wrong and what to do about it."""

    exit_code = 2
