"""The `kerasfrac` command: a thin argparse front over the library modules.

Each subcommand is registered by the module that owns its stage (``add_arguments`` sets
``func``), as in flax's examples and TFDS's CLI; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys

from kerasfrac import options

# Each command imports its modules when it runs (local imports): `--help`, bad options,
# config errors and wrong paths (the run, the model, the build) answer before TensorFlow's
# seconds-long import (the path checks below are TensorFlow-free).


def build_parser() -> argparse.ArgumentParser:
    from tfrecords_builder import cli as builder_cli

    parser = argparse.ArgumentParser(
        prog="kerasfrac",
        description="Bone-fracture classification on X-rays with TensorFlow/Keras.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show TensorFlow's own start-up and INFO/WARNING log lines (hidden by default, "
        "whatever TF_CPP_MIN_LOG_LEVEL says; an exported level still sets which later C++ "
        "log lines TensorFlow prints) and train's resolved config in full (one line by "
        "default; all of it goes to the run's config.yaml)",
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
    add_bench(sub)
    add_demo(sub)
    add_audit(sub)
    add_evaluate(sub)
    add_report(sub)
    add_predict(sub)
    add_explain(sub)
    add_export(sub)
    return parser


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    from importlib import metadata

    try:
        return metadata.version("kerasfrac")
    except metadata.PackageNotFoundError:
        from kerasfrac import __version__

        return __version__


def add_audit(sub) -> None:
    p = sub.add_parser(
        "audit",
        help="data card of a build and its no-anatomy baseline (Markdown, JSON, figure)",
        description="Counts by class and split, image sizes by class, duplicates and "
        "near-duplicates, and the no-anatomy baseline: a gradient-boosted classifier "
        "(scikit-learn) on the train split's non-anatomical features only (size, file bytes "
        "and JPEG flags, thumbnail intensity statistics, metadata columns), its test AUROC "
        "with a bootstrap CI, each feature family alone, and per-feature AUROCs. Writes "
        "audit.md, audit.json and audit.png into --out (default DATA_DIR/audit).",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="TFRecord directory (kerasfrac build)")
    options.add_arguments(p, options.AuditOptions)
    p.set_defaults(func=run_audit)


def run_audit(args) -> int:
    from tfrecords_builder.manifest import load_manifest

    load_manifest(args.data_dir)  # a wrong path answers before TensorFlow is imported
    from kerasfrac.evaluation import audit

    return audit.main(args.data_dir, options.from_args(options.AuditOptions, args))


def add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="exact metrics with CIs, baseline, thresholds, plots for a run",
        description="Evaluate a training run on a split: accuracy and loss, AUROC, average "
        "precision, sensitivity, specificity, balanced accuracy, F1, confusion matrix at 0.5 "
        "and at the Youden-J threshold chosen on val, the majority baseline, bootstrap 95% "
        "CIs and FracAtlas subgroups; calibration (ECE, Brier, reliability diagram) before "
        "and after a calibrator fitted on val, and sensitivity, specificity, PPV and NPV at "
        "operating points chosen on val. Writes metrics.json (metrics_val.json for --split "
        "val), calibration.json (what was chosen on val: predict uses it), predictions, "
        "plots/ and report.html (the run on one self-contained page, with galleries of the "
        "test images that matter for error analysis) into the run directory and prints a "
        "summary.",
    )
    p.add_argument("--run-dir", required=True, help="run directory written by `kerasfrac train`")
    p.add_argument("--model", help="model file (default RUN_DIR/model.keras)")
    options.add_arguments(p, options.EvaluateOptions)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    from kerasfrac import runs

    runs.check_run(args.run_dir, args.model)  # before TensorFlow is imported
    from kerasfrac.evaluation import evaluate

    opts = options.from_args(options.EvaluateOptions, args)
    m = evaluate.evaluate_run(args.run_dir, model_path=args.model, opts=opts)
    print(evaluate.summary(m))
    print(f"written: {runs.metrics_path(args.run_dir, opts.split)}")
    if opts.html:
        print(f"written: {runs.report_html_path(args.run_dir)} (open it in a browser)")
    return 0


def add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="table over runs: accuracy/loss beside AUROC (CI), AP, sens/spec, baseline",
        description="One row per run directory (its metrics.json, written by `kerasfrac "
        "evaluate`): the report's layout (dataset x pipeline: test accuracy and loss) "
        "extended with AUROC (95% CI), average precision, sensitivity, specificity and the "
        "majority baseline. Markdown to stdout (or --out), CSV with --csv, a self-contained HTML "
        "page with the runs' ROC curves overlaid with --html.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    options.add_arguments(p, options.ReportOptions)
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    from kerasfrac.evaluation import report

    return report.main(args.run_dirs, options.from_args(options.ReportOptions, args))


def add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a saved model to JPEG/PNG/DICOM images",
        description="Probability of 'fractured' for each image, prepared exactly as the "
        "evaluation pipeline does (settings from the config.yaml next to the model). DICOM: "
        "rescale slope/intercept and the first window applied, MONOCHROME1 inverted; no "
        "patient metadata is copied into any output. Files that are not images are reported "
        "and skipped. The probability is calibrated where `kerasfrac evaluate` fitted a "
        "calibrator on val (calibration.json; the output says which).",
    )
    p.add_argument("--model", required=True, help="a run directory, or a model file inside one")
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    options.add_arguments(p, options.PredictOptions)
    p.set_defaults(func=run_predict)


def run_predict(args) -> int:
    from pathlib import Path

    from kerasfrac import runs

    model = Path(args.model)
    if not (model / "export.json").is_file():  # a run or its model: checked before TensorFlow
        runs.check_run(model_file=runs.model_path(model) if model.is_dir() else model)
    from kerasfrac import predict

    opts = options.from_args(options.PredictOptions, args)
    return predict.main(args.model, args.paths, opts)


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="SavedModel (image bytes in), TFLite and a model card of a run",
        description="Export a run for use outside kerasfrac: a SavedModel whose serving "
        "signature takes encoded JPEG/PNG bytes and does the decoding, grayscale, resize and "
        "flip TTA inside (returns the calibrated probability, the decision at each operating "
        "point chosen on val and the box heat map where the model has one), a TFLite model "
        "of the same on a decoded uint8 image, export.json and MODEL_CARD.md. Run `kerasfrac "
        "evaluate` first: the calibrator and operating points come from its calibration.json.",
    )
    p.add_argument("--run-dir", required=True, help="run directory written by `kerasfrac train`")
    p.add_argument("--out", required=True, help="output folder")
    options.add_arguments(p, options.ExportOptions)
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from kerasfrac import runs

    runs.check_run(args.run_dir)  # before TensorFlow is imported
    from kerasfrac import export

    return export.main(args.run_dir, args.out, options.from_args(options.ExportOptions, args))


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
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last checkpoint, or a finished one to more "
        "epochs (--set train.epochs=N); without --config the run's own config.yaml is used",
    )
    resume.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run dir's unfinished run if there is one, else start fresh "
        "(for requeued Slurm jobs); exit code 75 means SIGTERM arrived and a checkpoint was saved",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--list-keys",
        action="store_true",
        help="list every config key with its type, default and allowed values, and exit",
    )
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from pathlib import Path

    import yaml

    from kerasfrac import config, console
    from kerasfrac.training import kernels

    if args.list_keys:
        print(config.keys_table())
        return 0
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    path = args.config
    if path is None and (args.resume or args.auto_resume) and args.run_dir:
        path = str(Path(args.run_dir) / "config.yaml")  # resume with the run's own settings
    cfg = config.load_config(path, overrides)
    from tfrecords_builder.manifest import check_data_dir

    check_data_dir(cfg.data.dir)  # a wrong data.dir answers before TensorFlow
    if getattr(args, "verbose", False):
        print("resolved config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        print(console.config_line(cfg), flush=True)
    asked = kernels.request_onednn(cfg.train.fast)
    if getattr(args, "verbose", False):
        print(f"CPU kernels: {asked}")
    from kerasfrac.training import train

    try:
        metrics = train.train(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            auto_resume=args.auto_resume,
            verbose=2 if getattr(args, "verbose", False) else 1,
        )
    except train.Preempted as err:
        print(f"kerasfrac train: {err}", file=sys.stderr)
        return train.Preempted.exit_code
    print(console.run_summary(metrics, cfg.run_dir))
    return 0


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="images/s of the input pipeline, the training step, both, and the builder",
        description="Measure after warm-up, in one process: the training input pipeline "
        "(uncached and cached), the training step on in-memory tensors (plain float32, the "
        "config's setting, and train.fast with each --precisions entry, each in a fresh "
        "process), the two together (fit), and the builder against the floor of decoding "
        "every image once. Settings: defaults -> --config -> --set key=value.",
    )
    p.add_argument("--config", help="YAML config (its data.dir must be a build)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    options.add_arguments(p, options.BenchOptions)
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from kerasfrac import bench, config
    from kerasfrac.training import kernels

    cfg = config.load_config(args.config, args.overrides)
    print(f"CPU kernels (input, fit): {kernels.request_onednn(cfg.train.fast)}")
    o = options.from_args(options.BenchOptions, args)
    what = bench.WHAT if o.what == ("all",) else o.what
    result = bench.run(
        cfg,
        what,
        o.steps,
        o.repeats,
        o.precisions,
        o.source,
        o.source_dataset,
        o.workers,
        profile=o.profile,
    )
    print(bench.table(result))
    if o.json:
        bench.write_json(result, o.json)
        print(f"figures written to {o.json}")
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build synthetic data, train briefly, evaluate (minutes)")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier demo's run in --out"
    )
    p.set_defaults(func=lambda args: _run_demo(args.out, args.overwrite, args.verbose))


def _run_demo(out, overwrite: bool = False, verbose: bool = False) -> int:
    from kerasfrac.training import kernels

    kernels.request_onednn(fast=True)  # the demo runs with train.fast's default
    from kerasfrac import demo

    demo.run(out, overwrite=overwrite, verbose=2 if verbose else 1)
    return 0


def add_explain(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="what the model looks at: class visualization, feature maps, Grad-CAM, audit",
        description="Look inside a trained run: class visualization by gradient ascent on the "
        "pixels (from noise and from real images), feature maps of each conv block, Grad-CAM "
        "overlays, and the shortcut audit over a split: the share of Grad-CAM mass in the "
        "image border band and corners per class, and for datasets with fracture boxes the "
        "pointing game (hit rate vs chance, mass inside the boxes). PNGs and explain.json go "
        "to --out (default RUN_DIR/explain, and then the PNGs also to "
        "RUN_DIR/tensorboard/explain; another --out leaves the run unchanged).",
    )
    p.add_argument("--run-dir", required=True, help="run directory written by `kerasfrac train`")
    p.add_argument("--model", help="model file (default RUN_DIR/model.keras)")
    p.add_argument(
        "--images",
        nargs="+",
        metavar="FILE",
        help="image files for the figures (default: images of the split)",
    )
    p.add_argument("--out", help="output folder (default RUN_DIR/explain)")
    options.add_arguments(p, options.ExplainOptions)
    p.set_defaults(func=run_explain)


def run_explain(args) -> int:
    from kerasfrac import runs

    runs.check_run(args.run_dir, args.model)  # before TensorFlow is imported
    from kerasfrac import explain

    opts = options.from_args(options.ExplainOptions, args)
    return explain.main(args.run_dir, opts, args.images, args.out, args.model)


def main(argv: list[str] | None = None) -> int:
    """The command; ``argv`` None (the console script, ``python -m kerasfrac.cli``) also
    filters TensorFlow's start-up lines out of this process' stderr
    (``tfrecords_builder.quiet``)."""
    args = build_parser().parse_args(argv)
    from tfrecords_builder.quiet import quiet_tensorflow

    quiet_tensorflow(args.verbose, filter_stderr=argv is None)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"kerasfrac {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder: one line, the path, the fix
        print(f"kerasfrac {args.command}: error: {os_error(err)}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # e.g. TrainingDiverged: already explains itself
        print(f"kerasfrac {args.command}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        tf = sys.modules.get("tensorflow")
        if tf is None or not isinstance(err, tf.errors.OpError):
            raise
        print(f"kerasfrac {args.command}: error: {tensorflow_error(err)}", file=sys.stderr)
        return 1


def os_error(err: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do."""
    import errno

    where = f" ({err.filename!r})" if err.filename else ""
    what = f"{err.strerror or err}{where}"
    if err.errno == errno.ENOSPC:
        return (
            f"{what}: the disk is full. Free space, or point --run-dir/--out at a larger disk, "
            "and run the command again (files it finished were written whole or not at all)"
        )
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}: not writable by you; choose a folder you can write (--run-dir/--out)"
    return what


def tensorflow_error(err) -> str:
    """One line for a TensorFlow op error (the first line of its message, and the fix)."""
    first = (err.message or str(err)).strip().splitlines()[0][:300]
    if type(err).__name__ == "DataLossError":
        return (
            f"a TFRecord shard is damaged ({first}); `kerasfrac audit DATA_DIR --verify` names "
            "the shard, and the build must be written again (`kerasfrac build ... --overwrite`)"
        )
    return f"TensorFlow: {type(err).__name__}: {first} (rerun with -v for TensorFlow's log)"


if __name__ == "__main__":
    sys.exit(main())
