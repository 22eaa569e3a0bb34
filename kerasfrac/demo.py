"""`kerasfrac demo`: the whole flow on a fresh machine, no dataset needed, in a few minutes.

Builds the synthetic phantom dataset, trains the paper CNN briefly at 64x64, evaluates on the
test split and prints where everything is. The settings are those of ``configs/demo.yaml``
(a test keeps the two equal).
"""

from __future__ import annotations

import json
from pathlib import Path

#: The demo's run settings: configs/demo.yaml holds the same (checked by a test).
DEMO_SETTINGS = {
    "dataset": "synthetic",
    "data": {"image_size": 64, "flips": "random"},
    "train": {"epochs": 10, "optimizer": "adam", "learning_rate": 1.0e-3, "weight_decay": 0.0},
}
DEMO_DATA = {"count": 1000, "fractured_fraction": 0.3, "image_size": 128, "seed": 42}


def run(out: str | Path = "demo-out", verbose: int = 1) -> dict:
    from kerasfrac import config, train
    from tfrecords_builder import synthetic
    from tfrecords_builder.build import BuildOptions, build

    out = Path(out).expanduser()
    raw, tfr, run_dir = out / "synthetic-raw", out / "tfrecords", out / "run"
    if raw.exists():
        import shutil

        shutil.rmtree(raw)
    synthetic.generate(raw, **DEMO_DATA)
    manifest = build("synthetic", raw, tfr, BuildOptions(overwrite=True, progress=verbose > 0))
    print(f"built {manifest['written']['total']} synthetic X-rays into {tfr}: {manifest['splits']}")
    cfg = config.from_dict(
        {
            **DEMO_SETTINGS,
            "run_dir": str(run_dir),
            "data": {**DEMO_SETTINGS["data"], "dir": str(tfr)},
        }
    )
    metrics = train.train(cfg, overwrite=True, verbose=verbose)
    print(json.dumps(metrics, indent=2))
    print(
        f"\nDone. Data: {tfr}\nRun:  {run_dir} (model.keras, metrics.json, predictions.csv, "
        f"history.csv)\nTensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}"
    )
    return metrics
