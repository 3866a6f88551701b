"""The `replfs` command: one subcommand per module, each with `register(subparsers)`.

A module registers its parser and sets `func=run` (a callable taking the parsed args and
returning an exit code or None). User errors (`ReplfsError`) print their message and
exit with its code; they never show a traceback.

`replfs SOURCE MOUNTPOINT -o OPTIONS` (a first argument that is no subcommand) is the
form in which mount(8), through mount.fuse3, runs the program a `fuse.replfs` type names:
see `replfs.tools.mount_helper`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from replfs.errors import ReplfsError

# One module per subcommand (or group of subcommands), each with `register(subparsers)`.
COMMAND_MODULES = ["raid_cmd", "mount_cmd", "fsck_cmd", "fault", "bench", "cluster_cmd"]


def register_modules(sub, names: list[str]) -> None:
    """Let each module replfs.tools.NAME add its parsers to `sub`."""
    for name in names:
        importlib.import_module(f"replfs.tools.{name}").register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replfs",
        description="A FUSE-mounted, replicated, transactional filesystem on RAID-5 image files.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"replfs {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register_modules(sub, COMMAND_MODULES)
    parser.subcommands = set(sub.choices)
    return parser


def version() -> str:
    """The installed distribution's version (pyproject.toml's, for `pip install -e .`)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("replfs")
    except PackageNotFoundError:
        return "unknown (not installed: run tools/bootstrap.sh)"


def main(args: list[str] | None = None) -> int:
    parser = build_parser()
    if args is None:
        args = sys.argv[1:]
    if args and args[0] not in parser.subcommands and os.path.isdir(args[0]):
        from replfs.tools.mount_helper import helper_argv
        try:
            args = helper_argv(args)
        except ReplfsError as exc:
            print(f"replfs: {exc}", file=sys.stderr)
            return exc.exit_code
    ns = parser.parse_args(args)
    try:
        rc = ns.func(ns)
    except ReplfsError as exc:
        if ns.debug:
            raise
        print(f"replfs {ns.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"replfs {ns.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`replfs status DIR | head`): as other tools, stop quietly;
        # stdout is pointed at /dev/null so that the interpreter's flush at exit is quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
