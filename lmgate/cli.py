"""
The C{lmgate} console script: the commands that are not the daemon itself.

The daemon is C{twistd -n lmgate}; this script holds the tools around it. Each
subcommand lives in its own module and exposes C{main(argv) -> int}.
"""

from __future__ import annotations

import sys
from typing import Callable

USAGE = """\
usage: lmgate COMMAND [ARGS...]

commands:
  stub     serve the providers' main endpoints from a deterministic fake upstream
  keys     manage the allow-list (hash, add, list, remove, check)
  report   summarise the usage records (tables, CSV, JSON, HTML; --sql for a query)
  export   write the usage records as Parquet or CSV for a warehouse
  limits   show or reset the usage-limit counters

The gateway itself runs under twistd:  twistd -n lmgate --config etc/lmgate.yaml
"""


def _stub(argv: list[str]) -> int:
    from lmgate.stub.server import main

    code: int = main(argv)
    return code


def _keys(argv: list[str]) -> int:
    from lmgate.access.keys import main

    code: int = main(argv)
    return code


def _report(argv: list[str]) -> int:
    from lmgate.ops.report import main

    code: int = main(argv)
    return code


def _export(argv: list[str]) -> int:
    from lmgate.ops.export import main

    code: int = main(argv)
    return code


def _limits(argv: list[str]) -> int:
    from lmgate.limits.cli import main

    code: int = main(argv)
    return code


COMMANDS: dict[str, Callable[[list[str]], int]] = {"stub": _stub, "keys": _keys, "report": _report, "export": _export,
                                                 "limits": _limits}


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; print usage for anything else."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        sys.stderr.write(f"lmgate: unknown command {args[0]!r}\n{USAGE}")
        return 2
    return command(args[1:])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
