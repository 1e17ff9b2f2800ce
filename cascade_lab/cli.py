"""The ``cascade-lab`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-lab", description="Stable Cascade from the command line.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list plugins, their hooks, registered names and load errors")
    sub.add_parser("samplers", help="list samplers")
    sub.add_parser("schedulers", help="list schedulers")
    sub.add_parser("variants", help="list weight variants")
    return parser


def _version() -> str:
    from . import __version__

    return f"cascade-lab {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import listing

    if args.command == "plugins":
        print(listing.plugins_text())
    else:
        print(listing.kind_text(args.command[:-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
