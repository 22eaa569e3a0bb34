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
    add_train(sub)
    add_demo(sub)
    return parser


def add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a config",
        description="Train from a YAML config. Settings apply in this order: built-in "
        "defaults (the report's recipe) -> --config YAML -> each --set key=value (later wins).",
    )
    p.add_argument("--config", help="YAML config (e.g. configs/fracatlas_aug.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=1 (repeatable)",
    )
    p.add_argument("--run-dir", help="run directory (overrides run_dir)")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from pathlib import Path

    import yaml

    from kerasfrac import config

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    path = args.config
    if path is None and args.resume and args.run_dir:
        path = str(Path(args.run_dir) / "config.yaml")  # resume with the run's own settings
    cfg = config.load_config(path, overrides)
    print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    from kerasfrac import train

    metrics = train.train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"test metrics: {metrics}\nrun directory: {cfg.run_dir}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build synthetic data, train briefly, evaluate (minutes)")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.set_defaults(func=lambda args: _run_demo(args.out))


def _run_demo(out) -> int:
    from kerasfrac import demo

    demo.run(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"kerasfrac {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # e.g. TrainingDiverged: already explains itself
        print(f"kerasfrac {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
