"""The `replfs` command: one subcommand per module, each with `register(subparsers)`.

A module registers its parser and sets `func=run` (a callable taking the parsed args and
returning an exit code or None). User errors (`ReplfsError`) print their message and
exit with its code; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register_modules(sub, COMMAND_MODULES)
    return parser


def main(args: list[str] | None = None) -> int:
    parser = build_parser()
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
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
