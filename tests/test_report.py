"""kerasfrac report: the expected table from fixture run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kerasfrac.cli import main
from kerasfrac.evaluation import report


def fake_run(root: Path, name: str, dataset: str, data: dict, metrics: dict) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": dataset, "data": data}))
    (run / "metrics.json").write_text(json.dumps({"split": "test", **metrics}))
    return run


FULL = {
    "n": 87,
    "accuracy": 0.7356,
    "loss": 0.55214,
    "majority_baseline_accuracy": 0.7126,
    "auroc": 0.7012,
    "ci95": {"auroc": [0.5876, 0.8123]},
    "average_precision": 0.4567,
    "sensitivity": 0.4,
    "specificity": 0.8710,
}


def baseline(base: float, diff: float, lo: float, hi: float) -> dict:
    """``no_anatomy_baseline`` as ``kerasfrac evaluate`` writes it: the verdict and its
    sentence come from evaluate's own rule (``_verdict``), not from a copy of it here."""
    from kerasfrac.evaluation.evaluate import _verdict

    difference = {"difference": diff, "ci95": [lo, hi]}
    beats, sentence = _verdict(difference)
    return {
        "baseline_auroc": {"auroc": base, "ci95": [base - 0.05, base + 0.05]},
        "difference": difference,
        "beats_baseline": beats,
        "sentence": sentence,
    }


@pytest.fixture
def runs(tmp_path):
    beaten = {**FULL, "no_anatomy_baseline": baseline(0.6312, 0.07, 0.0123, 0.1301)}
    # inside hands and within body region, as evaluate's baseline comparison writes them
    beaten["no_anatomy_baseline"]["subgroups"] = {
        "region=hand": {"difference": {"difference": -0.012, "ci95": [-0.081, 0.052]}},
    }
    beaten["no_anatomy_baseline"]["within_region"] = {
        "difference": {"difference": 0.031, "ci95": [0.001, 0.064]}
    }
    build = tmp_path / "build"
    build.mkdir()
    (build / "manifest.json").write_text(json.dumps({"seed": 42}))  # the split seed
    a = fake_run(tmp_path, "fa_small", "fracatlas", {"image_size": 224, "dir": str(build)}, beaten)
    # train.py's older metrics.json: no CI, AP, sensitivity or specificity
    b = fake_run(
        tmp_path,
        "fa_orig",
        "fracatlas",
        {"image_size": 512},
        {"n": 10, "accuracy": 0.9, "loss": 0.3, "majority_baseline_accuracy": 0.6, "auroc": 0.95},
    )
    c = fake_run(
        tmp_path,
        "tib_aug",
        "tibia-fibula",
        {"image_size": 512, "flips": "expand"},
        {
            **FULL,
            "accuracy": 0.5,
            "ci95": {},
            "no_anatomy_baseline": baseline(0.69, 0.0112, -0.04, 0.061),
        },
    )
    return [a, b, c]


EXPECTED = """\
| Dataset | Pipeline | Run | Split seed | Split given | Test images | Accuracy | Loss | Majority baseline | AUROC [95% CI] | No-anatomy baseline AUROC | Model - baseline [95% CI] | In hands: model - baseline | Within region: model - baseline | AP | Sensitivity | Specificity | Paper accuracy | Paper loss |
|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|
| fracatlas | original | fa_orig | n/a | n/a | 10 | 90.0% | 0.3000 | 60.0% | 0.950 | n/a | n/a | n/a | n/a | n/a | n/a | n/a | 78.0% | 0.5521 |
| fracatlas | downsized | fa_small | 42 | n/a | 87 | 73.6% | 0.5521 | 71.3% | 0.701 [0.588, 0.812] | 0.631 | +0.070 [+0.012, +0.130] | -0.012 [-0.081, +0.052] | +0.031 [+0.001, +0.064] | 0.457 | 40.0% | 87.1% | 74.0% | 0.5554 |
| tibia-fibula | augmented | tib_aug | n/a | n/a | 87 | 50.0% | 0.5521 | 71.3% | 0.701 | 0.690 | +0.011 [-0.040, +0.061] | n/a | n/a | 0.457 | 40.0% | 87.1% | 98.0% | 0.0377 |

Accuracy at or below the majority baseline (always answering the larger class): tib_aug.

Not clearly better than a model that never sees a bone (the no-anatomy baseline of `kerasfrac audit`; the difference's CI reaches 0): tib_aug.
"""  # noqa: E501


def test_markdown_table_with_paper_numbers(runs, tmp_path, capsys):
    out_md, out_csv = tmp_path / "t.md", tmp_path / "t.csv"
    assert (
        main(["report", *map(str, runs), "--paper", "--out", str(out_md), "--csv", str(out_csv)])
        == 0
    )
    assert out_md.read_text() == EXPECTED
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["fa_orig", "fa_small", "tib_aug"]
    assert rows[1]["auroc_ci_low"] == "0.5876" and rows[1]["paper_loss"] == "0.5554"
    assert rows[0]["sensitivity"] == "" and rows[0]["baseline_auroc"] == ""
    assert (
        rows[1]["baseline_auroc"] == "0.6312" and rows[1]["auroc_minus_baseline_ci_low"] == "0.0123"
    )
    # stdout without --paper: no paper columns
    assert main(["report", *map(str, runs)]) == 0
    text = capsys.readouterr().out
    assert (
        "Paper accuracy" not in text
        and "| fracatlas | downsized | fa_small | 42 | n/a | 87 |" in text
    )
    assert rows[1]["split_seed"] == "42" and rows[1]["hands_minus_baseline_ci_low"] == "-0.081"


def test_paper_results_file_has_the_report_numbers():
    paper = report.load_paper_results()
    assert paper["fracatlas"]["original"] == {"accuracy": 0.78, "loss": 0.5521}
    assert paper["fracatlas"]["augmented"] == {"accuracy": 0.77, "loss": 0.5482}
    assert paper["fracatlas"]["downsized"] == {"accuracy": 0.74, "loss": 0.5554}
    assert paper["tibia-fibula"]["original"] == {"accuracy": 0.99, "loss": 0.022}
    assert paper["tibia-fibula"]["augmented"] == {"accuracy": 0.98, "loss": 0.0377}
    assert paper["tibia-fibula"]["downsized"] == {"accuracy": 0.98, "loss": 0.0743}


def test_report_errors(tmp_path, capsys):
    (tmp_path / "bare").mkdir()
    assert main(["report", str(tmp_path / "bare")]) == 2
    assert "kerasfrac evaluate" in capsys.readouterr().err
    val = fake_run(tmp_path, "val", "fracatlas", {}, FULL)
    (val / "metrics.json").write_text(json.dumps({**FULL, "split": "val"}))
    with pytest.raises(ValueError, match="'val' split"):
        report.run_row(val)
