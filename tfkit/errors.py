"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class TfkitError(Exception):
    """A failure during work (exit code 1)."""

    exit_code = 1
    every_rank = False  # under torchrun, whether all ranks hit it alike (then rank 0 alone reports it)


class UsageError(TfkitError):
    """Bad usage or bad input: an unknown name, a malformed option, a missing file (exit code 2)."""

    exit_code = 2
    every_rank = True
