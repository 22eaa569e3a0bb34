"""The commands' options: one dataclass per command, each field an ``option`` (see
``tfrecords_builder.clioptions``), so every default is written once, in the dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from kerasfrac.config import TrainConfig
from kerasfrac.names import CAM_METHODS, CAM_TARGETS, N_BOOTSTRAP, SPLITS
from tfrecords_builder.clioptions import add_arguments, from_args, option  # noqa: F401
from tfrecords_builder.defaults import DEFAULT_MAX_PIXELS

# --------------------------------------------------------------------------- explain

WHAT = ("class-vis", "feature-maps", "grad-cam", "audit")


@dataclass
class AscentOptions:
    """Gradient ascent of ``kerasfrac explain``'s class visualisation. The regularisers are on
    by default (as in Lucid and keras-io's "visualizing what convnets learn"): without them
    the ascent grows pixel noise that drives the logit to +-200 or more."""

    steps: int = option(100, "ascent steps")
    step_size: float = option(0.01, "ascent RMS change per pixel and step")
    l2: float = option(0.1, "ascent L2 penalty weight (pulls pixels towards gray)")
    tv: float = option(0.2, "ascent total-variation penalty weight (smooths pixel noise)")
    jitter: int = option(2, "ascent random shift, pixels (before each step, undone after)")
    blur_every: int = option(4, "blur every N ascent steps (0: never)")
    blur_sigma: float = option(0.7, "sigma of that blur, pixels")
    seed: int = option(0, "seed of the noise start and the jitter")

    def check(self) -> None:
        if self.steps < 1 or self.step_size <= 0:
            raise ValueError(
                f"ascent needs steps >= 1 and step_size > 0; got steps={self.steps}, "
                f"step_size={self.step_size}"
            )
        if (
            self.l2 < 0
            or self.tv < 0
            or self.jitter < 0
            or self.blur_every < 0
            or self.blur_sigma <= 0
        ):
            raise ValueError(
                f"ascent regularisers must be non-negative (blur_sigma positive); got "
                f"l2={self.l2}, tv={self.tv}, jitter={self.jitter}, blur_every={self.blur_every}, "
                f"blur_sigma={self.blur_sigma}"
            )


@dataclass
class ExplainOptions:
    split: str = option("test", "split whose images are explained", choices=SPLITS)
    what: tuple[str, ...] = option(WHAT, f"comma-separated parts of {','.join(WHAT)}")
    n_images: int = option(8, "images in the figures (from the split unless --images)")
    vis_images: int = option(2, "real images also used as ascent starts")
    cam_layer: str | None = option(
        None,
        "Grad-CAM layer",
        flag="--layer",
        default_text="for a Flatten -> Dense head such as paper_cnn's, the last block's map "
        "after its activation (relu3); else the last conv block",
    )
    cam_method: str | None = option(
        None,
        "CAM method",
        choices=CAM_METHODS,
        default_text="hirescam for Flatten -> Dense heads (exact there), gradcam otherwise; "
        "boxmap: the model's own box heat map (model.box_head)",
    )
    cam_target: str = option("label", "class each map explains", choices=CAM_TARGETS)
    feature_layers: list[str] | None = option(
        None, "comma-separated layers", default_text="conv block outputs"
    )
    max_channels: int = option(16, "channels per feature-map row")
    border: float = option(0.1, "border band width, fraction of the side")
    corner: float = option(0.25, "corner square side, fraction of the side")
    tolerance: float = option(0.0, "pointing game: grow boxes by N pixels")
    batch_size: int = option(TrainConfig.batch_size, "images per batch")
    ascent: AscentOptions = field(default_factory=AscentOptions)

    def check(self) -> None:
        unknown = [w for w in self.what if w not in WHAT]
        if unknown or not self.what:
            raise ValueError(
                f"--what {','.join(self.what)!r}: unknown part {unknown[0] if unknown else ''!r};"
                f" choose a comma-separated subset of {','.join(WHAT)}"
            )
        if self.cam_method is not None and self.cam_method not in CAM_METHODS:
            raise ValueError(f"cam method must be one of {CAM_METHODS}; got {self.cam_method!r}")
        if self.cam_target not in CAM_TARGETS:
            raise ValueError(f"cam target must be one of {CAM_TARGETS}; got {self.cam_target!r}")
        if self.n_images < 1 or self.batch_size < 1:
            raise ValueError("n_images and batch_size must be >= 1")
        from kerasfrac.explain import gradcam

        gradcam.border_mask((8, 8), self.border)
        gradcam.corner_masks((8, 8), self.corner)
        self.ascent.check()


# --------------------------------------------------------------------------- evaluate


@dataclass
class EvaluateOptions:
    split: str = option(
        "test",
        "split to evaluate; train: the training images in inference mode, no augmentation "
        "(is the model under- or over-fitting? compare with val)",
        choices=SPLITS,
    )
    n_bootstrap: int = option(
        N_BOOTSTRAP, "bootstrap resamples (0: no CIs)", flag="--bootstrap", metavar="N"
    )
    seed: int = option(0, "bootstrap seed")
    recompute: bool = option(False, "predict again even if predictions exist")
    plots: bool = option(True, "skip the PNG plots")
    baseline: bool = option(
        True, "skip the no-anatomy baseline (kerasfrac audit) beside the model's AUROC"
    )
    sensitivity: tuple[float, ...] = option(
        (0.9, 0.95),
        "operating points: thresholds chosen on val to reach each sensitivity (comma-separated)",
        parse=lambda text: _shares(text, "--sensitivity"),
    )
    specificity: tuple[float, ...] = option(
        (),
        "operating points: thresholds chosen on val to keep each specificity",
        default_text="none",
        parse=lambda text: _shares(text, "--specificity"),
    )
    prevalence: float | None = option(
        None,
        "deployment prevalence (share fractured) that calibrated probabilities are shifted to",
        default_text="val's",
        parse=lambda text: _shares(text, "--prevalence", open_interval=True)[0],
    )
    html: bool = option(
        True,
        "skip report.html (the run on one self-contained page) and its test-image galleries",
    )
    gallery_size: int = option(
        6,
        "report.html: images in each gallery (the most confident false positives and false "
        "negatives, a sample of true positives)",
    )
    #: Images per batch when predicting; None: the run's train.batch_size.
    batch_size: int | None = None


def _shares(text: str, flag: str, open_interval: bool = False) -> tuple[float, ...]:
    """Comma-separated shares in [0, 1] ((0, 1) with ``open_interval``)."""
    values = []
    for part in (x.strip() for x in text.split(",") if x.strip()):
        try:
            v = float(part)
        except ValueError:
            v = float("nan")
        inside = 0.0 < v < 1.0 if open_interval else 0.0 <= v <= 1.0  # nan is neither
        if not inside:
            interval = "(0, 1)" if open_interval else "[0, 1]"
            raise ValueError(f"{flag} takes shares in {interval}, e.g. 0.9; got {part!r}")
        values.append(v)
    return tuple(values)


# --------------------------------------------------------------------------- predict


@dataclass
class PredictOptions:
    threshold: float | None = option(
        None,
        "call fractured at probability >= T",
        default_text="the run's Youden-J threshold in metrics.json, else 0.5",
    )
    operating_point: str | None = option(
        None,
        "decide at an operating point `kerasfrac evaluate` chose on val (e.g. sensitivity_0.90;"
        " listed in the run's calibration.json)",
        default_text="the run's Youden-J threshold",
    )
    csv: str | None = option(
        None, "also write path, probability, model_probability, class, threshold to this CSV"
    )
    cam: str | None = option(
        None,
        "write one overlay PNG per image into this folder: Grad-CAM, the box head's peak, "
        "probability and decision",
        metavar="DIR",
    )
    batch_size: int = option(TrainConfig.batch_size, "images per batch")
    #: Images above this many pixels are skipped unread (the builder's --max-pixels).
    max_pixels: int = DEFAULT_MAX_PIXELS


# --------------------------------------------------------------------------- export


@dataclass
class ExportOptions:
    overwrite: bool = option(False, "replace an earlier export in --out")
    quantize: bool = option(
        False,
        "also write a dynamic-range quantised TFLite model (int8 weights) and measure both "
        "TFLite models' val AUROC",
    )
    bench: int = option(
        0, "time N val images through the SavedModel, TFLite and predict's path", metavar="N"
    )


# --------------------------------------------------------------------------- report


@dataclass
class ReportOptions:
    out: str | None = option(None, "write the Markdown table to this file (else stdout)")
    csv: str | None = option(None, "also write the table as CSV")
    html: str | None = option(
        None,
        "also write a self-contained HTML page comparing the runs (the table, each run's "
        "report.html linked, their test ROC curves overlaid)",
        metavar="OUT.html",
    )
    paper: bool = option(False, "add the report's published numbers beside ours")
    paper_results: str | None = option(
        None,
        "YAML file of published numbers",
        default_text="kerasfrac.evaluation.report.PAPER_RESULTS",
    )


# --------------------------------------------------------------------------- audit


@dataclass
class AuditOptions:
    out: str | None = option(None, "output folder", default_text="DATA_DIR/audit")
    seed: int = option(0, "classifier and bootstrap seed")
    n_bootstrap: int = option(N_BOOTSTRAP, "bootstrap resamples", flag="--bootstrap", metavar="N")
    verify: bool = option(
        False,
        "first read every record (TFRecord checksums) and compare each shard's sha256 with "
        "the manifest's; a damaged shard is named with the command that rebuilds it",
    )


# --------------------------------------------------------------------------- bench


@dataclass
class BenchOptions:
    what: tuple[str, ...] = option(("all",), "input,train,fit,build or all")
    steps: int = option(20, "batches timed per repeat")
    repeats: int = option(3, "repeats (median, min, max)")
    precisions: list[str] | None = option(
        None,
        "precisions tried with train.fast, e.g. float32,mixed_bfloat16",
        default_text="the config's, and mixed_float16 on a GPU or mixed_bfloat16 on a CPU "
        "with bfloat16 units",
    )
    source: str | None = option(None, "build: dataset folder", default_text="synthetic phantoms")
    source_dataset: str | None = option(
        None, "build: layout of --source", default_text="the config's dataset"
    )
    workers: int | None = option(None, "build: threads", default_text="all cores")
    json: str | None = option(None, "also write the figures to this JSON file")
    profile: bool = option(
        False,
        "train: also profile a few steps of each setting (TensorFlow's profiler) and print "
        "the milliseconds per op kind (convolution forward / data / weight gradients, batch "
        "norm, element-wise, casts, optimizer, other)",
    )
