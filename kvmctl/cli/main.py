"""The command line's entry point: parse once, run the command, map what went wrong to one
readable line and an exit status (a traceback only with --debug)."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from ..errors import KvmctlError, ManifestError
from . import commands
from .exits import USAGE, ExitStatus, exit_status
from .options import Command, CommandOptions, build_parser
from .report import Env, print_problems

COMMANDS: dict[str, Command] = {
    "validate": commands.cmd_validate, "render": commands.cmd_render,
    "plan": commands.cmd_plan, "apply": commands.cmd_apply,
    "destroy": commands.cmd_destroy, "get": commands.cmd_get,
    "sync": commands.cmd_sync, "controller": commands.cmd_controller,
    "status": commands.cmd_status, "snapshot": commands.cmd_snapshot,
    "backup": commands.cmd_backup, "restore": commands.cmd_restore,
    "import": commands.cmd_import,
}


def parser() -> argparse.ArgumentParser:
    from .. import __version__
    return build_parser(COMMANDS, __version__)


def run(argv: Sequence[str], env: Env) -> int:
    p = parser()
    try:
        ns = p.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        code = int(exc.code or 0)
        return ExitStatus.ERROR if code == USAGE and _two_means_changes(argv) else code
    command: Command | None = getattr(ns, "run", None)
    if command is None:
        p.print_help(env.stdout)
        return USAGE
    opts = CommandOptions.from_namespace(ns)
    return dispatch(command, opts, env)


def _two_means_changes(argv: Sequence[str]) -> bool:
    """Whether exit status 2 would read as "changes present" for this command line (which
    argparse refused, so there are no parsed options to ask)."""
    words = [a for a in argv if not a.startswith("-")]
    return "--detailed-exitcode" in argv or bool(words and words[0] == "diff")


def dispatch(command: Command, opts: CommandOptions, env: Env) -> int:
    try:
        return command(opts, env)
    except ManifestError as exc:
        print_problems(exc.problems, "text", env.stderr)
        return ExitStatus.ERROR
    except KvmctlError as exc:
        if opts.debug:
            raise
        env.stderr.write(f"error: {exc}\n")
        return exit_status(exc, opts.two_means_changes)
    except KeyboardInterrupt:
        env.stderr.write("interrupted\n")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        return ExitStatus.ERROR
    except Exception as exc:  # a bug: say so in one line, traceback only with --debug
        if opts.debug:
            raise
        env.stderr.write(f"internal error: {type(exc).__name__}: {exc} "
                         "(please report it; --debug shows the traceback)\n")
        return ExitStatus.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    # One command per process: what it allocates is freed by reference counting, or at exit.
    # Python's cycle collector would instead scan the growing heap over and over while
    # thousands of documents and definitions load (a fifth of a 10,000-VM plan; the peak
    # memory is the same without it).
    gc.disable()
    env = Env(sys.stdin, sys.stdout, sys.stderr)
    return run(sys.argv[1:] if argv is None else argv, env)
