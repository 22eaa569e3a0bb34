"""`kerasfrac demo`: the whole flow on a fresh machine, no dataset needed, in a few minutes.

Builds the synthetic phantom dataset, trains the paper CNN briefly at 64x64, evaluates on the
test split (metrics.json with CIs, ROC/PR/confusion/training-curve plots) and prints a short
summary: where everything is and what to run next. An earlier demo's run is replaced only
with ``--overwrite``. The settings are those of ``DEMO_CONFIG`` (kerasfrac/demo.yaml, shipped
with the package; configs/demo.yaml links to it).
"""

from __future__ import annotations

import json
from pathlib import Path

# Local imports: `kerasfrac demo --help` and its output checks come before TensorFlow.

#: The demo's run settings (data.dir and run_dir are set by the demo).
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
#: The demo's phantoms: generated at the size trained on, with a fainter fracture line (72%
#: of the bone removed, not all of it) and 1.5x the noise, so that the task is not trivial:
#: test AUROC 0.956 [0.892, 0.998] (with full lines it was 1.000 [1.000, 1.000]).
DEMO_DATA = {
    "count": 600,
    "fractured_fraction": 0.3,
    "image_size": 64,
    "seed": 42,
    "line_strength": 0.72,
    "noise_scale": 1.5,
}


#: A file the demo leaves in its --out folder; only there does a rerun replace OWN.
MARKER = ".kerasfrac-demo"
OWN = ("synthetic-raw", "tfrecords", "run")


class DemoOutError(ValueError):
    """A --out folder that holds what the demo did not write."""


def check_out(out: Path) -> None:
    """Refuse ``out`` unless it is new or empty, or an earlier demo's folder whose
    synthetic-raw/, tfrecords/ and run/ are still the demo's own (what a rerun replaces)."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    fix = "Choose a new or empty --out (default demo-out). Nothing was changed."
    if not out.is_dir():
        raise DemoOutError(f"--out {str(out)!r} is a file, not a folder. {fix}")
    if not (out / MARKER).is_file():
        raise DemoOutError(
            f"--out {str(out)!r} already holds files that `kerasfrac demo` did not write "
            f"({', '.join(sorted(p.name for p in out.iterdir())[:8])}); the demo writes and, "
            f"on a rerun, replaces {', '.join(OWN)} in it. {fix}"
        )
    raw, tfr, run_dir = (out / name for name in OWN)
    manifest = tfr / "manifest.json"
    if tfr.exists():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            m = {}
        if m.get("source") != "synthetic" or m.get("source_path") != str(raw.resolve()):
            raise DemoOutError(
                f"{str(tfr)!r} is not the demo's synthetic build (its manifest names "
                f"source={m.get('source')!r}, source_path={m.get('source_path')!r}); the demo "
                f"would replace it. {fix}"
            )
    if run_dir.exists():
        import yaml

        try:
            data_dir = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["dir"]
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            data_dir = None
        if data_dir is None or Path(data_dir).resolve() != tfr.resolve():
            raise DemoOutError(
                f"{str(run_dir)!r} is not a run of the demo (its config.yaml does not train on "
                f"{str(tfr)!r}); the demo would replace it. {fix}"
            )


def check_no_run(out: Path, overwrite: bool) -> None:
    """Refuse to replace an earlier demo's run (its model and metrics) without ``overwrite``."""
    run_dir = Path(out) / "run"
    if run_dir.exists() and not overwrite:
        raise DemoOutError(
            f"{str(run_dir)!r} holds an earlier demo run (model.keras, metrics.json, plots); "
            "the demo would replace it. Pass --overwrite to replace it, or choose another "
            "--out. Nothing was changed."
        )


def run(out: str | Path = "demo-out", verbose: int = 1, overwrite: bool = False) -> dict:
    """Build, train, evaluate (metrics.json with CIs, plots) into ``out``; returns the test
    metrics. An earlier demo's run in ``out`` is replaced only with ``overwrite``."""
    from kerasfrac import config, console
    from kerasfrac.evaluation import evaluate
    from kerasfrac.training import train
    from tfrecords_builder.build import BuildOptions, build
    from tfrecords_builder.datasets import synthetic

    out = Path(out).expanduser()
    raw, tfr, run_dir = out / "synthetic-raw", out / "tfrecords", out / "run"
    check_out(out)
    check_no_run(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `kerasfrac demo`: it replaces " + ", ".join(OWN) + "\n")
    if raw.exists():
        import shutil

        shutil.rmtree(raw)
    synthetic.generate(raw, **DEMO_DATA)
    manifest = build("synthetic", raw, tfr, BuildOptions(overwrite=True, progress=verbose > 0))
    splits = ", ".join(
        f"{name} {c['fractured']} fractured + {c['normal']} normal"
        for name, c in manifest["splits"].items()
    )
    print(f"built {manifest['written']['total']} synthetic X-rays into {tfr}: {splits}")
    cfg = config.load_config(DEMO_CONFIG, [f"data.dir={tfr}", f"run_dir={run_dir}"])
    train.train(cfg, overwrite=True, verbose=verbose)
    metrics = evaluate.evaluate_run(run_dir, "test")  # metrics.json with CIs, and the plots
    print("\n" + console.run_summary(metrics, run_dir, title="demo, test split"))
    # The summary above lists the run's files and the next commands: only what it lacks.
    print(
        f"\nDone. Data: {tfr}\nPage: {run_dir / 'report.html'} (all of it, open it in a "
        f"browser)\nTensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
    )
    return metrics
