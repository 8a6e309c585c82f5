"""Errors a user can act on: the CLI prints them as one line, without a traceback."""

import sys
import traceback
from pathlib import Path

debug = False  # the CLI's --debug: tracebacks instead of one-line errors


class TfkitError(Exception):
    """A failure during work (exit code 1)."""

    exit_code = 1
    every_rank = False  # under torchrun, whether all ranks hit it alike (then rank 0 alone reports it)


class UsageError(TfkitError):
    """Bad usage or bad input: an unknown name, a malformed option, a missing file (exit code 2)."""

    exit_code = 2
    every_rank = True


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message: libraries' multi-line reports in one line."""
    return next((line.strip()[:limit] for line in str(error).splitlines() if line.strip()), "no detail")


def report_bad_input(path: Path, error: Exception) -> None:
    """One line on stderr for an input file that failed (its traceback too under --debug), so that the
    caller can go on with the other inputs."""
    if debug:
        traceback.print_exception(error)
    if isinstance(error, UsageError):
        text = str(error) if str(path) in str(error) else f"{path}: {error}"
    else:  # a decoder's own exception, a tensor too large for memory, ...
        text = f"{path}: {type(error).__name__}: {first_line(error)}"
    print(f"error: {text}", file=sys.stderr)
