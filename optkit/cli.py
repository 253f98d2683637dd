"""``optkit`` command line: one entry point, one module per subcommand (optkit.commands.*)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Subcommand modules; each defines ``register(subparsers)`` which sets ``func`` on its parser.
COMMANDS = (
    "optkit.commands.convert",
    "optkit.commands.random_weights",
    "optkit.commands.generate",
    "optkit.commands.serve",
    "optkit.commands.bench",
    "optkit.commands.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optkit",
        description="Serve, parallelize and benchmark OPT language models on JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # others' INFO lines: JAX's "Unable to initialize backend 'tpu'",
        for name in ("jax", "httpx"):  # httpx's one per request of a load test
            logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"optkit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
