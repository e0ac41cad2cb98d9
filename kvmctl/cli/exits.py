"""Exit statuses, and the one table that maps an error to its status."""

from __future__ import annotations

from enum import IntEnum, unique

from ..errors import KvmctlError, UsageError


@unique
class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1
    # Changes present (plan --detailed-exitcode, diff). Elsewhere 2 is a wrong command line,
    # argparse's convention; where 2 means changes, a wrong command line exits ERROR instead.
    CHANGES = 2
    INTERRUPTED = 130


USAGE = ExitStatus.CHANGES  # the same number, for the other meaning

_BY_ERROR: tuple[tuple[type[KvmctlError], ExitStatus], ...] = ((UsageError, USAGE),)


def exit_status(exc: KvmctlError, two_means_changes: bool) -> ExitStatus:
    """The status of a failed command; never 2 where 2 would read as "changes present"."""
    if two_means_changes:
        return ExitStatus.ERROR
    return next((status for kind, status in _BY_ERROR if isinstance(exc, kind)),
                ExitStatus.ERROR)
