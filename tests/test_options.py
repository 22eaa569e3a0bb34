"""kerasfrac.options: the command line is derived from the option dataclasses' defaults."""

from __future__ import annotations

import dataclasses

import pytest

from kerasfrac import options
from kerasfrac.cli import build_parser


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_options_left_out_keep_the_dataclass_defaults():
    args = parse("explain", "--run-dir", "R")
    assert options.from_args(options.ExplainOptions, args) == options.ExplainOptions()
    args = parse("evaluate", "--run-dir", "R")
    assert options.from_args(options.EvaluateOptions, args) == options.EvaluateOptions()
    args = parse("predict", "--model", "M", "x.png")
    assert options.from_args(options.PredictOptions, args) == options.PredictOptions()
    args = parse("report", "R")
    assert options.from_args(options.ReportOptions, args) == options.ReportOptions()
    args = parse("audit", "D")
    assert options.from_args(options.AuditOptions, args) == options.AuditOptions()
    args = parse("bench")
    assert options.from_args(options.BenchOptions, args) == options.BenchOptions()


def test_given_options_reach_the_dataclass_typed_and_nested():
    args = parse(
        "explain",
        "--run-dir",
        "R",
        "--what",
        "grad-cam, audit",
        "--layer",
        "relu2",
        "--feature-layers",
        "bn1,bn2",
        "--border",
        "0.2",
        "--steps",
        "5",
        "--seed",
        "3",
        "--cam-method",
        "gradcam",
    )
    opts = options.from_args(options.ExplainOptions, args)
    assert opts.what == ("grad-cam", "audit") and opts.cam_layer == "relu2"
    assert opts.feature_layers == ["bn1", "bn2"] and opts.border == 0.2
    assert opts.cam_method == "gradcam"
    assert (opts.ascent.steps, opts.ascent.seed) == (5, 3)
    assert opts.ascent.step_size == options.AscentOptions().step_size
    e = options.from_args(
        options.EvaluateOptions,
        parse("evaluate", "--run-dir", "R", "--no-plots", "--recompute", "--bootstrap", "0"),
    )
    assert (e.plots, e.recompute, e.baseline, e.n_bootstrap) == (False, True, True, 0)
    b = options.from_args(options.BenchOptions, parse("bench", "--what", "input,train"))
    assert b.what == ("input", "train") and b.precisions is None
    with pytest.raises(SystemExit):
        parse("explain", "--run-dir", "R", "--cam-target", "elbow")  # choices from names


def test_help_shows_the_dataclass_default(capsys):
    with pytest.raises(SystemExit):
        parse("explain", "--help")
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(options.ExplainOptions):
        if f.name in ("batch_size", "max_channels", "n_images"):
            assert f"(default: {f.default})" in text, f.name
    assert "(default: 16)" in text  # the batch size is TrainConfig's
