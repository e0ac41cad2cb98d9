"""The command line: parses options, runs a pipeline, prints, chooses the exit code.

The only module that prints or exits. Heavy modules (libvirt, jsonschema, jinja2, rich) are
imported inside the commands that need them so `kvmctl --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Sequence, TextIO

from .errors import KvmctlError, ManifestError, Problem, UsageError


class ExitStatus(IntEnum):
    OK = 0
    ERROR = 1
    CHANGES = 2  # only with --detailed-exitcode (plan) and always with diff
    USAGE = 2
    INTERRUPTED = 130


@dataclass(frozen=True)
class Env:
    """Every stream the program uses, so tests run the real CLI with captured output."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    @property
    def interactive(self) -> bool:
        return self.stdin.isatty() and self.stdout.isatty()


def default_uri() -> str:
    return (os.environ.get("KVMCTL_CONNECT") or os.environ.get("LIBVIRT_DEFAULT_URI")
            or "qemu:///system")


def _manifest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", action="append", default=[], metavar="PATH",
                   help="manifest file, directory, or - for standard input (repeatable)")
    p.add_argument("-R", "--recursive", action="store_true",
                   help="read directories given with -f recursively")


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", "-c", default=None, metavar="URI",
                   help="libvirt URI (default: $KVMCTL_CONNECT, $LIBVIRT_DEFAULT_URI, "
                        "qemu:///system)")
    p.add_argument("--project", default=os.environ.get("KVMCTL_PROJECT", "default"),
                   help="the project that owns what these manifests create "
                        "(default: $KVMCTL_PROJECT or 'default')")
    p.add_argument("--domain-type", choices=("auto", "kvm", "qemu"),
                   default=os.environ.get("KVMCTL_DOMAIN_TYPE", "auto"),
                   help="libvirt domain type for VMs that do not set one: kvm, qemu (TCG "
                        "emulation), or auto (kvm when the host CPU has VT-x/AMD-V); "
                        "default: $KVMCTL_DOMAIN_TYPE or auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmctl", description="Declarative VMs, networks and disks for KVM/libvirt.")
    parser.add_argument("--version", action="version", version=f"kvmctl {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check manifests against the schemas and each other")
    _manifest_options(p)
    p.add_argument("-o", "--output", choices=("text", "json", "github"), default="text")
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("render", help="print the libvirt XML the manifests produce")
    _manifest_options(p)
    p.add_argument("--kind", help="only objects of this kind")
    p.add_argument("--name", help="only the object with this name")
    p.add_argument("--project", default=os.environ.get("KVMCTL_PROJECT", "default"))
    p.add_argument("--domain-type", choices=("kvm", "qemu"),
                   default=os.environ.get("KVMCTL_DOMAIN_TYPE", "kvm")
                   if os.environ.get("KVMCTL_DOMAIN_TYPE") in ("kvm", "qemu") else "kvm")
    p.set_defaults(run=cmd_render)

    _engine_commands(sub)
    return parser


def _engine_commands(sub: Any) -> None:
    """plan, diff, apply, destroy, get: they talk to libvirt (see engine commands below)."""
    try:
        from . import cli_engine
    except ImportError:  # the engine is optional while it is being built
        return
    cli_engine.register(sub, _manifest_options, _engine_options)


def _version() -> str:
    from . import __version__
    return __version__


def load_manifests(args: argparse.Namespace, env: Env) -> Any:
    from . import documents, validate
    if not args.filename:
        raise UsageError("no manifests given: use -f FILE, -f DIR or -f -")
    docs = documents.load(args.filename, recursive=args.recursive, stdin=env.stdin)
    return docs, validate.validate(docs)


def print_problems(problems: Sequence[Problem], fmt: str, out: TextIO) -> None:
    if fmt == "json":
        json.dump([_problem_json(p) for p in problems], out, indent=2)
        out.write("\n")
    elif fmt == "github":
        for p in problems:
            message = p.message + (f" ({p.path})" if p.path else "") + \
                (f" hint: {p.hint}" if p.hint else "")
            where = f"file={_gh_escape(p.location.file, True)}"
            if p.location.line:  # a problem of a whole file has no line
                where += f",line={p.location.line},col={p.location.column}"
            out.write(f"::error {where}::{_gh_escape(message)}\n")
    else:
        for p in problems:
            out.write(f"{p}\n")
        count = len(problems)
        out.write(f"{count} problem{'s' if count != 1 else ''} found\n")


def _gh_escape(text: str, property_value: bool = False) -> str:
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property_value:  # workflow command properties are separated by , and end at ::
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"file": p.location.file, "line": p.location.line, "column": p.location.column,
            "severity": p.severity, "message": p.message, "path": p.path, "hint": p.hint}


def cmd_validate(args: argparse.Namespace, env: Env) -> int:
    try:
        docs, _ = load_manifests(args, env)
    except ManifestError as exc:
        print_problems(exc.problems, args.output, env.stdout)
        return ExitStatus.ERROR
    if args.output == "json":
        env.stdout.write("[]\n")
    elif args.output == "text":
        env.stdout.write(f"{len(docs)} document{'s' if len(docs) != 1 else ''} valid\n")
    return ExitStatus.OK


def cmd_render(args: argparse.Namespace, env: Env) -> int:
    from . import render
    _, manifest = load_manifests(args, env)
    rendered = [r for r in render.render_all(manifest, args.project, args.domain_type)
                if (not args.kind or r.kind.lower() == args.kind.lower())
                and (not args.name or r.name == args.name)]
    if not rendered:
        raise UsageError("no object matches --kind/--name")
    for r in rendered:
        if len(rendered) > 1:
            env.stdout.write(f"<!-- {r.kind}/{r.name} -->\n")
        env.stdout.write(r.xml if r.xml.endswith("\n") else r.xml + "\n")
    return ExitStatus.OK


def run(argv: Sequence[str], env: Env) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its message
        code = int(exc.code or 0)
        return ExitStatus.ERROR if code == ExitStatus.USAGE and _two_means_changes(argv) \
            else code
    if not getattr(args, "run", None):
        parser.print_help(env.stdout)
        return ExitStatus.USAGE
    return _dispatch(args.run, args, env)


def _two_means_changes(argv: Sequence[str]) -> bool:
    """Whether exit status 2 would read as "changes present" for this command line."""
    words = [a for a in argv if not a.startswith("-")]
    return "--detailed-exitcode" in argv or bool(words and words[0] == "diff")


def _dispatch(command: Callable[[argparse.Namespace, Env], int], args: argparse.Namespace,
              env: Env) -> int:
    try:
        return command(args, env)
    except ManifestError as exc:
        print_problems(exc.problems, "text", env.stderr)
        return ExitStatus.ERROR
    except KvmctlError as exc:
        if args.debug:
            raise
        env.stderr.write(f"error: {exc}\n")
        if getattr(args, "detailed_exitcode", False):
            return ExitStatus.ERROR  # 2 means "changes" here: every error is 1
        return exc.exit_code
    except KeyboardInterrupt:
        env.stderr.write("interrupted\n")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        return ExitStatus.ERROR
    except Exception as exc:  # a bug: say so in one line, traceback only with --debug
        if args.debug:
            raise
        env.stderr.write(f"internal error: {type(exc).__name__}: {exc} "
                         "(please report it; --debug shows the traceback)\n")
        return ExitStatus.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    env = Env(sys.stdin, sys.stdout, sys.stderr)
    return run(sys.argv[1:] if argv is None else argv, env)


if __name__ == "__main__":
    sys.exit(main())
