"""A table over evaluated runs: the report's layout (dataset x pipeline: test accuracy and
loss) extended with AUROC (95% CI), the no-anatomy baseline's AUROC on the same images and the
model's lead over it (paired bootstrap CI; ``kerasfrac evaluate`` computes both), average
precision, sensitivity, specificity and the majority baseline; optionally the report's
published numbers beside ours.

Each run directory needs ``metrics.json`` (``kerasfrac evaluate``; train.py's own, older
metrics.json also works, with n/a where a metric is missing) and ``config.yaml``, from which
the pipeline is named: ``augmented`` (data.flips=expand), ``downsized`` (image_size < 512),
else ``original``.
"""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import yaml

from kerasfrac import runs
from kerasfrac.options import ReportOptions
from tfrecords_builder.manifest import read_manifest

#: The report's published test results (accuracy and mean binary cross-entropy loss on the
#: test split), per dataset and pipeline; the report gave no AUROC, sensitivity, specificity
#: or baseline. original: 512x512 grayscale, minority class oversampled (configs/*_orig.yaml);
#: augmented: original + left-right and up-down flips, 3x (configs/*_aug.yaml); downsized:
#: original at 224x224 (configs/*_small.yaml).
PAPER_RESULTS = {
    "fracatlas": {
        "original": {"accuracy": 0.78, "loss": 0.5521},
        "augmented": {"accuracy": 0.77, "loss": 0.5482},
        "downsized": {"accuracy": 0.74, "loss": 0.5554},
    },
    "tibia-fibula": {
        "original": {"accuracy": 0.99, "loss": 0.022},
        "augmented": {"accuracy": 0.98, "loss": 0.0377},
        "downsized": {"accuracy": 0.98, "loss": 0.0743},
    },
}

COLUMNS = (
    ("dataset", "Dataset"),
    ("pipeline", "Pipeline"),
    ("run", "Run"),
    ("split_seed", "Split seed"),
    ("split_given", "Split given"),
    ("n", "Test images"),
    ("accuracy", "Accuracy"),
    ("loss", "Loss"),
    ("majority_baseline_accuracy", "Majority baseline"),
    ("auroc", "AUROC [95% CI]"),
    ("baseline_auroc", "No-anatomy baseline AUROC"),
    ("auroc_minus_baseline", "Model - baseline [95% CI]"),
    ("hands_minus_baseline", "In hands: model - baseline"),
    ("within_region_minus_baseline", "Within region: model - baseline"),
    ("average_precision", "AP"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
)
PAPER_COLUMNS = (("paper_accuracy", "Paper accuracy"), ("paper_loss", "Paper loss"))


def pipeline_name(cfg: dict) -> str:
    data = cfg.get("data", {})
    parts = []
    if data.get("flips") == "expand":
        parts.append("augmented")
    if int(data.get("image_size", 512)) < 512:
        parts.append("downsized")
    return "+".join(parts) or "original"


def load_paper_results(path: str | Path | None = None) -> dict:
    """``PAPER_RESULTS``, or the published numbers in the YAML file ``path`` (same layout)."""
    if not path:
        return copy.deepcopy(PAPER_RESULTS)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"published results file {str(path)!r} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def run_row(run_dir: str | Path) -> dict:
    """One table row (raw numbers) from a run directory's metrics.json and config.yaml."""
    run_dir = Path(run_dir)
    metrics_file, config_file = runs.metrics_path(run_dir, "test"), runs.config_path(run_dir)
    m = runs.read_metrics(run_dir)
    inner = sorted(p.name for p in run_dir.glob("*/config.yaml")) if run_dir.is_dir() else []
    if m is None and not config_file.is_file() and inner:
        raise ValueError(
            f"{str(run_dir)!r} is a folder of runs, not a run; pass the runs themselves, e.g. "
            f"`kerasfrac report {run_dir}/*`"
        )
    if not run_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} does not exist")
    if m is None:
        raise ValueError(
            f"{str(run_dir)!r} has no metrics.json; run `kerasfrac evaluate --run-dir "
            f"{run_dir}` first"
        )
    if not config_file.is_file():
        raise ValueError(f"{str(run_dir)!r} has no config.yaml: it is not a kerasfrac run")
    if m.get("split", "test") != "test":
        raise ValueError(
            f"{str(metrics_file)!r} holds metrics of the {m['split']!r} split, not test; "
            f"rerun `kerasfrac evaluate --run-dir {run_dir}`"
        )
    cfg = yaml.safe_load(config_file.read_text()) or {}
    ci = (m.get("ci95") or {}).get("auroc")
    base = m.get("no_anatomy_baseline") or {}
    diff = base.get("difference") or {}
    diff_ci = diff.get("ci95")
    hands = ((base.get("subgroups") or {}).get("region=hand") or {}).get("difference") or {}
    within = (base.get("within_region") or {}).get("difference") or {}
    return {
        "dataset": cfg.get("dataset", "?"),
        "pipeline": pipeline_name(cfg),
        "run": run_dir.name,
        "split_seed": _split_seed(m.get("data_dir") or (cfg.get("data") or {}).get("dir")),
        **_given(m),
        "n": m.get("n"),
        "accuracy": m.get("accuracy"),
        "loss": m.get("loss"),
        "majority_baseline_accuracy": m.get("majority_baseline_accuracy"),
        "auroc": m.get("auroc"),
        "auroc_ci_low": ci[0] if ci else None,
        "auroc_ci_high": ci[1] if ci else None,
        "average_precision": m.get("average_precision"),
        "sensitivity": m.get("sensitivity"),
        "specificity": m.get("specificity"),
        "baseline_auroc": (base.get("baseline_auroc") or {}).get("auroc"),
        "auroc_minus_baseline": diff.get("difference"),
        "auroc_minus_baseline_ci_low": diff_ci[0] if diff_ci else None,
        "auroc_minus_baseline_ci_high": diff_ci[1] if diff_ci else None,
        "beats_baseline": base.get("beats_baseline"),
        **_lead("hands_minus_baseline", hands),
        **_lead("within_region_minus_baseline", within),
    }


def _given(m: dict) -> dict:
    """``split_given``: "--split-file" or "official" where the build's split was given, "no"
    where kerasfrac drew it, None where metrics.json predates the note; and its note."""
    if "split_given" not in m:
        return {"split_given": None, "split_given_note": None}
    given = m["split_given"] or {}
    return {"split_given": given.get("by", "no"), "split_given_note": given.get("note")}


def _lead(key: str, diff: dict) -> dict:
    ci = diff.get("ci95")
    return {
        key: diff.get("difference"),
        f"{key}_ci_low": ci[0] if ci else None,
        f"{key}_ci_high": ci[1] if ci else None,
    }


def _split_seed(data_dir) -> int | None:
    """The split seed of the build a run was evaluated on (its manifest's ``seed``); None
    where the build is gone or says nothing."""
    return (read_manifest(data_dir) or {}).get("seed")


def rows(run_dirs, paper: dict | None = None) -> list[dict]:
    out = []
    for d in run_dirs:
        row = run_row(d)
        row["dir"] = str(d)  # two runs may share a folder name
        if paper is not None:
            published = paper.get(row["dataset"], {}).get(row["pipeline"], {})
            row["paper_accuracy"] = published.get("accuracy")
            row["paper_loss"] = published.get("loss")
        out.append(row)
    order = {"original": 0, "augmented": 1, "downsized": 2}
    return sorted(out, key=lambda r: (r["dataset"], order.get(r["pipeline"], 9), r["run"]))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_cell(key: str, row: dict) -> str:
    """The table's text for column ``key`` of ``row`` (CIs in brackets, n/a where missing)."""
    x = row.get(key)
    if key in ("dataset", "pipeline", "run", "split_given") and x is not None:
        return str(x)
    if x is None:
        return "n/a"
    if key in ("n", "split_seed"):
        return str(x)
    if key in ("loss", "paper_loss"):
        return f"{x:.4f}"
    if key == "auroc":
        if row.get("auroc_ci_low") is None:
            return f"{x:.3f}"
        return f"{x:.3f} [{row['auroc_ci_low']:.3f}, {row['auroc_ci_high']:.3f}]"
    if key in ("average_precision", "baseline_auroc"):
        return f"{x:.3f}"
    if key.endswith("_minus_baseline"):
        if row.get(f"{key}_ci_low") is None:
            return f"{x:+.3f}"
        return f"{x:+.3f} [{row[f'{key}_ci_low']:+.3f}, {row[f'{key}_ci_high']:+.3f}]"
    return _pct(x)


def markdown(table: list[dict], paper: bool = False) -> str:
    cols = COLUMNS + (PAPER_COLUMNS if paper else ())
    lines = [
        "| " + " | ".join(title for _, title in cols) + " |",
        "|"
        + "|".join("---" if k in ("dataset", "pipeline", "run") else "--:" for k, _ in cols)
        + "|",
    ]
    for row in table:
        lines.append("| " + " | ".join(format_cell(k, row) for k, _ in cols) + " |")
    below = [r["run"] for r in table if below_majority(r)]
    if below:
        lines.append("")
        lines.append(
            "Accuracy at or below the majority baseline (always answering the larger class): "
            + ", ".join(below)
            + "."
        )
    given = [f"{r['run']} ({r['split_given_note']})" for r in table if r.get("split_given_note")]
    if given:
        lines.append("")
        lines.append("Split given, not drawn by kerasfrac: " + "; ".join(given) + ".")
    not_beating = [r["run"] for r in table if r.get("beats_baseline") is False]
    if not_beating:
        lines.append("")
        lines.append(
            "Not clearly better than a model that never sees a bone (the no-anatomy baseline of "
            "`kerasfrac audit`; the difference's CI reaches 0): " + ", ".join(not_beating) + "."
        )
    return "\n".join(lines) + "\n"


def below_majority(row: dict) -> bool:
    """Accuracy at or below the majority baseline's."""
    a, b = row.get("accuracy"), row.get("majority_baseline_accuracy")
    return a is not None and b is not None and a <= b


def write_csv(path: str | Path, table: list[dict], paper: bool = False) -> None:
    keys = [
        "dataset",
        "pipeline",
        "run",
        "split_seed",
        "split_given",
        "n",
        "accuracy",
        "loss",
        "majority_baseline_accuracy",
        "auroc",
        "auroc_ci_low",
        "auroc_ci_high",
        "baseline_auroc",
        "auroc_minus_baseline",
        "auroc_minus_baseline_ci_low",
        "auroc_minus_baseline_ci_high",
        *(
            f"{k}{end}"
            for k in ("hands_minus_baseline", "within_region_minus_baseline")
            for end in ("", "_ci_low", "_ci_high")
        ),
        "average_precision",
        "sensitivity",
        "specificity",
    ] + (["paper_accuracy", "paper_loss"] if paper else [])
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(keys)
    for row in table:
        out.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
    runs.write_text(Path(path), buf.getvalue())


def main(run_dirs, opts: ReportOptions) -> int:
    """``kerasfrac report``: see ``cli.add_report``."""
    if opts.html:  # a wrong --html fails before any output
        from kerasfrac.evaluation import html

        html.check_out(opts.html)
    paper = load_paper_results(opts.paper_results) if opts.paper else None
    table = rows(run_dirs, paper)
    text = markdown(table, paper=opts.paper)
    if opts.out:
        runs.write_text(Path(opts.out), text)
        print(f"written: {opts.out}")
    else:
        print(text, end="")
    if opts.csv:
        write_csv(opts.csv, table, paper=opts.paper)
        print(f"written: {opts.csv}")
    if opts.html:
        print(f"written: {html.write_compare(opts.html, run_dirs)}")
    return 0
