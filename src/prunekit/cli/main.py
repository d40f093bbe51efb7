"""``prunekit`` command line.  Each subcommand is a module in this package with ``add_parser(subparsers)``
that sets ``func`` — a function taking the parsed args, printing its result and returning an exit code."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from prunekit.cli.errors import USER_ERRORS
from prunekit.core.version import __version__

# subcommand modules, in help order
SUBCOMMANDS = ["run", "report", "info", "sensitivity", "shared", "compact", "export", "bench"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prunekit",
        description="Prune PyTorch models (CNNs, BERT-family) with typed structures and algorithms; "
                    "measure sparsity, size and speed.",
        epilog="Start with: prunekit run recipes/lenet5_oneshot.yaml --out runs/lenet5 ; prunekit report runs/lenet5")
    p.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"prunekit.cli.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` etc.: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one clear line, no traceback
        if isinstance(e, USER_ERRORS):
            print(f"prunekit {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
