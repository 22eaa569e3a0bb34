"""The `kerasfrac` command: a thin argparse front over the library modules.

Each subcommand is registered by the module that owns its stage (``add_arguments`` sets
``func``), as in flax's examples and TFDS's CLI; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import os
import sys

# Keep TensorFlow's C++ INFO/WARNING chatter out of the user's terminal (errors still show).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    from tfrecords_builder import cli as builder_cli

    parser = argparse.ArgumentParser(
        prog="kerasfrac",
        description="Bone-fracture classification on X-rays with TensorFlow/Keras.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    builder_cli.add_arguments(
        sub.add_parser(
            "build",
            help="build sharded TFRecords from a dataset",
            description=builder_cli.DESCRIPTION,
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"kerasfrac {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
