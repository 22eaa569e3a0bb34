"""Typed run configuration: defaults -> YAML -> ``key=value`` overrides, validated up front.

The defaults are the report's recipe (SGD, learning rate 1e-4, weight decay 0.2, batch 16,
5 epochs, 512x512 grayscale, minority class oversampled, no flips), so a YAML file holds only
what differs from them. ``load_config`` fails with a ``ConfigError`` that names the key, the
expected type and the allowed keys before any heavy work starts (TensorFlow is not imported
here). ``Config.save`` writes the resolved configuration into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kerasfrac.models import registry
from kerasfrac.names import (
    BOX_LOSSES,
    BOX_TARGETS,
    CLASS_WEIGHTS,
    DISTRIBUTES,
    FLIPS,
    HEADS,
    OPTIMIZERS,
    PRECISIONS,
    RESIZES,
    SCHEDULES,
    SELECTS,
    TTAS,
)
from tfrecords_builder import datasets

#: The allowed values of each config key that takes one of a few names (``validate``
#: checks them, ``kerasfrac train --list-keys`` shows them); ``choices()`` adds model.name.
CHOICES = {
    "data.flips": FLIPS,
    "data.resize": RESIZES,
    "model.head": HEADS,
    "train.box_target": BOX_TARGETS,
    "train.box_loss": BOX_LOSSES,
    "train.optimizer": OPTIMIZERS,
    "train.schedule": SCHEDULES,
    "train.class_weight": CLASS_WEIGHTS,
    "train.select": SELECTS,
    "eval.tta": TTAS,
    "train.precision": PRECISIONS,
    "train.distribute": DISTRIBUTES,
}


def choices() -> dict[str, tuple[str, ...]]:
    """``CHOICES``, the registered datasets (``dataset``) and architectures (``model.name``),
    read when asked, so one registered after import counts."""
    return {"dataset": datasets.names(), **CHOICES, "model.name": registry.names()}


#: Upper bounds that keep a typo from running for days or into an out-of-memory traceback.
MAX_IMAGE_SIZE = 4096
MAX_EPOCHS = 10_000
MAX_BATCH = 4096


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or value out of range."""


@dataclass
class DataConfig:
    #: TFRecord directory written by ``kerasfrac build`` (holds manifest.json).
    dir: str = ""
    #: Images are resized to image_size x image_size (512 in the report, 224 "downsized").
    image_size: int = 512
    #: One-channel grayscale (the report); False keeps/expands to 3 channels.
    grayscale: bool = True
    #: Upsample the training split's minority class to the majority's size (balanced stream).
    oversample: bool = True
    #: none | expand (each training image also flipped left-right and up-down: 3x, the
    #: report's "augmented") | random (a random flip per image and epoch).
    flips: str = "none"
    #: memory | none | a directory for tf.data cache files (decoded, resized images).
    cache: str = "memory"
    #: stretch (the report: squash to a square) | pad (keep aspect ratio, zero padding).
    resize: str = "stretch"
    #: Shuffle buffer (images) of the training stream; each class stream gets one.
    shuffle_buffer: int = 1024
    #: Training augmentation after the cache, drawn per image and epoch from seeded stateless
    #: streams (0 = off, the report's setting). One affine warp: rotation by up to
    #: ``rotation`` degrees, zoom by a factor in [1 - zoom, 1 + zoom], shift by up to
    #: ``translate`` x the image size (black fill, as the X-ray background); then, on the
    #: image only: gamma exp(+-gamma), contrast x [1 - contrast, 1 + contrast] about the mean,
    #: brightness +- brightness. Fracture boxes (model.box_head) move with the warp.
    rotation: float = 0.0
    zoom: float = 0.0
    translate: float = 0.0
    gamma: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0


@dataclass
class ModelConfig:
    #: A registered architecture (kerasfrac.models.registry), each listed below.
    name: str = "paper_cnn"
    #: none | imagenet (vgg16, resnet50v2, efficientnetv2b0; needs a download) | a weights
    #: file (the whole model's for paper_cnn/resnet_small, the backbone's for the others).
    weights: str = "none"
    #: Box supervision: a second output, a coarse heat map on the last feature map, trained
    #: to be 1 on cells holding a fracture box and 0 elsewhere and on normal images
    #: (resnet_small and the keras.applications backbones; weight: train.box_loss_weight).
    box_head: bool = False
    #: Multi-task supervision from FracAtlas' metadata: a further output (training only, not
    #: in model.keras) predicting each image's body region, hardware, multiscan and view flags
    #: (dataset.csv columns, tfrecords_builder.defaults.META_TARGETS) from the pooled features,
    #: by a masked BCE weighted train.meta_loss_weight. FracAtlas, and the metadata targets of
    #: MURA, GRAZPEDWRI-DX and CSV builds (docs/datasets.md); resnet_small and the
    #: keras.applications backbones.
    meta_head: bool = False
    #: Classifier head (resnet_small and the keras.applications backbones): gap (global
    #: average pooling of the last feature map -> dropout -> Dense) | avgmax (each channel's
    #: average and maximum over the map, concatenated -> dropout -> Dense) | heatmap (the maximum of
    #: per-cell fracture logits, the cells that model.box_head supervises: the classifier
    #: then reads what the box supervision shapes) | attention (the global average beside
    #: the features weighted by the softmax of those cells: attention pooling) | presence
    #: (the global average beside the highest of those cells' logits: presence pooling).
    head: str = "gap"
    #: BatchNormalization momentum of the moving statistics used at inference. 0.9 equals
    #: PyTorch's default (momentum=0.1), whose SGD(weight_decay=...) the report's recipe reads
    #: like; Keras' own default 0.99 needs ~500 steps before the statistics settle, so short
    #: runs (the report's 5 epochs, the demo) predicted one class at evaluation time.
    bn_momentum: float = 0.9
    #: resnet_small only: channels of its first stage, doubled at each of the four stages
    #: (32: 2.8 M parameters). Compute per image grows about as its square.
    width: int = 32
    #: resnet_small only: pre-activation blocks per stage.
    blocks_per_stage: int = 2
    #: resnet_small with model.box_head (or a head that reads the cells: heatmap, attention)
    #: only: pixels per cell of the box heat map, 32 (the last feature map: 10x10 cells at
    #: 320 px), 16 (stage 3 and the upsampled last feature map together: 20x20 cells, finer
    #: for finger fractures) or 8 (the dense mask head: a light FPN-style decoder adding
    #: stages 3 and 2 to the upsampled last feature map, 40x40 cells; pair it with
    #: train.box_target=outline and train.box_loss=bce_dice).
    box_stride: int = 32
    #: resnet_small only: stochastic depth, the probability of dropping the last block's
    #: residual branch for an image in training (earlier blocks less, linearly down to 0 for
    #: the first); 0 = off. Typical 0.05-0.2.
    drop_path: float = 0.0
    #: With several replicas (GPUs/workers): True = BatchNorm normalises with the statistics of
    #: the global batch (an all-reduce per BN layer and step), so every worker keeps identical
    #: moving statistics; False = each replica uses its own local batch (less communication,
    #: moving statistics differ between workers and the chief's are saved). No effect on one
    #: device.
    sync_batchnorm: bool = True


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 16
    #: sgd | adam | adamw (Keras' AdamW; its weight decay is the same decoupled decay).
    optimizer: str = "sgd"
    #: The peak learning rate (after warm-up with the cosine schedule).
    learning_rate: float = 1e-4
    #: constant | cosine (linear warm-up over warmup_epochs, then cosine decay to 0 at the
    #: last epoch; keras.optimizers.schedules.CosineDecay).
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    #: Binary label smoothing: targets 1 -> 1 - s/2, 0 -> s/2.
    label_smoothing: float = 0.0
    #: none | balanced (each class's loss weighted by n / (2 n_class) of the train split: an
    #: alternative to data.oversample; use one of the two).
    class_weight: str = "none"
    #: Mixup (Zhang et al. 2018): each training image is blended with another image of its
    #: batch, x = lam x_i + (1 - lam) x_j, and so are its label and box-cell targets, with
    #: lam ~ Beta(mixup, mixup) folded to >= 0.5 (image i dominates); the box weight is the
    #: smaller of the two images' (boxless fractured images have unknown cells). 0 = off;
    #: 0.2-0.4 usual.
    mixup: float = 0.0
    #: Copy-paste of fractures (model.box_head only): each training image receives, with this
    #: probability, the fracture box of another image of its batch, pasted at the same place
    #: with feathered edges where it is at least 0.7 as bright there (bone onto bone); it is
    #: then labelled fractured and its box mask gains the pasted box. Meant to show fractures
    #: in new contexts (other bones, other hardware). 0 = off; not in the recipe (docs/recipe.md).
    box_paste: float = 0.0
    #: Counterfactual fills (model.box_head only): each training image is chosen with this
    #: probability; half of the chosen fractured images with a box mask get their fracture
    #: (its grown bounding rectangle) Coons-filled and are labelled normal, every other chosen
    #: image gets a control window of a fracture's size filled on bone, label kept. Meant to
    #: make the classifier depend on the fracture region itself. 0 = off (docs/evaluation.md).
    fracture_fill: float = 0.0
    #: Weight of the box heat-map loss (model.box_head): mean pixel BCE per image, counted
    #: for normal images and for fractured images that have boxes.
    box_loss_weight: float = 1.0
    #: What the box heat map learns (model.box_head): box (the cells a fracture box touches)
    #: | outline (the cells the fracture's outline covers, FracAtlas' COCO polygon; a box
    #: without one counts whole). Outlines need a build made since they are stored.
    box_target: str = "box"
    #: The box heat map's loss (model.box_head): bce (the mean per-cell BCE) | bce_dice (plus,
    #: on images with fracture cells, the soft Dice loss 1 - 2|p.g| / (|p| + |g|), which the
    #: few fracture cells of a fine map weigh as much as all the others).
    box_loss: str = "bce"
    #: Weight of the metadata loss (model.meta_head): per image, the mean BCE over its known
    #: metadata columns.
    meta_loss_weight: float = 0.5
    #: Stop when val AUROC has not improved for this many epochs (None: never).
    early_stopping_patience: int | None = None
    #: Polyak averaging of the weights (the optimizer's use_ema): each step the average moves
    #: (1 - ema_momentum) of the way to the weights. Validation, the best checkpoint and
    #: model.keras use the average; training continues from the raw weights. 0 = off.
    ema_momentum: float = 0.0
    #: Which weights become model.keras and are tested: last (the report) | best (the epoch
    #: with the best val AUROC, checkpoints/best.keras). Chosen on val only, never on test.
    select: str = "last"
    momentum: float = 0.0
    #: Keras 3 weight decay is decoupled and applies to every trainable variable ...
    weight_decay: float = 0.2
    #: ... unless this is set: then BatchNorm parameters and biases are not decayed.
    exclude_from_weight_decay: bool = False
    seed: int = 42
    #: tf.config.experimental.enable_op_determinism() (slower; bit-reproducible runs).
    deterministic: bool = False
    #: float32 | mixed_float16 | mixed_bfloat16 | auto (mixed_float16 on a GPU, mixed_bfloat16
    #: on a CPU with bfloat16 units, float32 elsewhere). model.keras always computes in float32.
    precision: str = "float32"
    #: Fast float32 kernels, same maths: TensorFlow's fused BatchNorm op (one replica) and,
    #: for the `kerasfrac` command, oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS=1 unless set).
    #: false = plain Keras layers with TensorFlow's default kernels.
    fast: bool = True
    distribute: str = "auto"
    #: Override of the data pipeline's steps per epoch (None: the pipeline decides).
    steps_per_epoch: int | None = None
    #: Also checkpoint every N steps (None: at epoch ends only).
    checkpoint_every_steps: int | None = None


@dataclass
class EvalConfig:
    #: Test-time augmentation in validation, evaluate and predict: none | flip (the mean
    #: probability of the image and its left-right mirror).
    tta: str = "none"
    #: Score the test split when training ends (predictions.csv, metrics.json). false holds
    #: test back while settings are being chosen: the run ends with the final model's val
    #: metrics (metrics_val.json), and `kerasfrac evaluate --run-dir RUN` reads test once,
    #: when the recipe is final.
    test_at_end: bool = True


@dataclass
class Config:
    #: Which dataset the run is for; must match the TFRecord manifest's "source".
    dataset: str = "fracatlas"
    run_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the resolved configuration as YAML (loadable again with ``load_config``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "# Resolved kerasfrac configuration (defaults + YAML + overrides).\n"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)  # one rename: a kill never leaves a truncated config
        return path


# --------------------------------------------------------------------------- loading


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults, then the YAML file at ``path`` (optional), then ``key=value`` overrides.

    Overrides use dotted keys (``train.learning_rate=1e-3``); values are parsed with
    ``yaml.safe_load`` (so ``true``, ``16``, ``null`` get their types). Environment variables
    and ``~`` in paths are expanded after merging. Raises ``ConfigError`` on any problem.
    """
    cfg = Config()
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = _load_yaml(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {str(path)!r} is not text (UTF-8 YAML): byte {e.start} cannot be "
                "decoded; it was damaged or is another kind of file. Pass a YAML config (a "
                "run's config.yaml is rewritten by `kerasfrac train`)"
            ) from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of keys, "
                f"got {type(loaded).__name__}"
            )
        _merge(cfg, loaded, prefix="")
    for item in overrides:
        _merge(cfg, _parse_override(item), prefix="")
    _expand_paths(cfg)
    validate(cfg)
    return cfg


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a few nested aliases expand to
    billions of nodes ("billion laughs"), and a config needs none."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            mark = self.peek_event().start_mark
            problem = "aliases (*name) are not accepted in a config: write the value out"
            raise yaml.composer.ComposerError(None, None, problem, mark)
        return super().compose_node(parent, index)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length for an error message."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 80, 80, 6, 6, 2


def from_dict(values: dict) -> Config:
    """A validated Config from a (possibly partial) nested dict, e.g. ``Config.to_dict()``."""
    cfg = Config()
    _merge(cfg, values, prefix="")
    _expand_paths(cfg)
    validate(cfg)
    return cfg


def _parse_override(item: str) -> dict:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=1)")
    try:
        value = _load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML: {e}") from e
    nested: dict = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _merge(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            where = f"in {prefix[:-1]!r}" if prefix else "at the top level"
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {dotted!r}; allowed keys {where}: {', '.join(names)}.{hint}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key {dotted!r} is a section; expected a mapping of "
                    f"{', '.join(f.name for f in dataclasses.fields(current))}, got {_short(value)}"
                )
            _merge(current, value, prefix=f"{dotted}.")
        elif value is None and dotted in _WAS_NULL_FOR_DEFAULT:
            continue  # a run's config.yaml from before these keys had defaults: the default
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


#: Keys that took null for "the architecture's default" before their defaults were written in
#: ModelConfig; a run's config.yaml of that time stores null, read as the default.
_WAS_NULL_FOR_DEFAULT = ("model.width", "model.blocks_per_stage", "model.box_stride")


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check ``value`` against the field type; the few safe conversions are explicit."""
    allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typ is type(None):
            continue
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is float and isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept what float() accepts.
            try:
                return float(value)
            except ValueError:
                pass
        if typ is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            # Paths and names; a bare number as a name (e.g. run_dir: 2024) is fine.
            return str(value)
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(
        f"config key {key!r} expects {names}, got {_short(value)} ({type(value).__name__})"
    )


_UNSET_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expand(key: str, value: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(value))
    missing = [a or b for a, b in _UNSET_VAR.findall(expanded) if (a or b) not in os.environ]
    if missing:
        raise ConfigError(
            f"config key {key!r} = {_short(value)} uses environment variable {missing[0]} which "
            f"is not set; export it or override the key (--set {key}=PATH)"
        )
    return expanded


def _expand_paths(cfg: Config) -> None:
    cfg.run_dir = _expand("run_dir", cfg.run_dir)
    cfg.data.dir = _expand("data.dir", cfg.data.dir)
    if cfg.data.cache not in ("memory", "none"):
        cfg.data.cache = _expand("data.cache", cfg.data.cache)
    if cfg.model.weights not in ("none", "imagenet"):
        cfg.model.weights = _expand("model.weights", cfg.model.weights)


# --------------------------------------------------------------------------- validation


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(
            f"config key {key!r} must be one of {', '.join(allowed)}; got {_short(value)}"
        )


def _positive(key: str, value: int | float | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or not 0 < value < math.inf:  # nan and inf are no positive numbers
        raise ConfigError(f"config key {key!r} must be a positive number; got {value!r}")


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    """Value checks that types alone do not catch; raises ConfigError naming the key."""
    for key, allowed in choices().items():
        _one_of(key, _get(cfg, key), allowed)
    if not cfg.run_dir:
        raise ConfigError("config key 'run_dir' must not be empty")
    _validate_data(cfg.data)
    _validate_model(cfg)
    _validate_train(cfg)


def _in_range(key: str, value, low: float, high: float, hint: str = "", *, closed=False) -> None:
    """``low <= value < high`` (``<= high`` where ``closed``), finite: else a ConfigError
    naming the key, the range and ``hint``; NaN fails."""
    ok = math.isfinite(value) and low <= value and (value <= high if closed else value < high)
    if not ok:
        bound = "]" if closed else ")"
        wanted = f">= {low}" if high == math.inf else f"in [{low}, {high}{bound}"
        raise ConfigError(f"config key {key!r} must be {wanted}{hint}; got {value!r}")


def _validate_data(d: DataConfig) -> None:
    # paper_cnn pools twice; below 8 px there is nothing left to classify.
    if d.image_size < 8:
        raise ConfigError(
            f"config key 'data.image_size' must be a positive integer of at least 8 (pixels); "
            f"got {d.image_size!r}"
        )
    if d.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(
            f"config key 'data.image_size' must be at most {MAX_IMAGE_SIZE} pixels (FracAtlas' "
            f"largest side is 2,880; one {MAX_IMAGE_SIZE} px float32 image is 64 MiB before any "
            f"layer); got {d.image_size!r}"
        )
    if not d.cache:
        raise ConfigError("config key 'data.cache' must be memory, none or a directory; got ''")
    _positive("data.shuffle_buffer", d.shuffle_buffer)
    for key, upper in (
        ("rotation", 180.0),
        ("zoom", 0.9),
        ("translate", 0.5),
        ("gamma", 2.0),
        ("contrast", 0.9),
        ("brightness", 1.0),
    ):
        value = getattr(d, key)
        if not (math.isfinite(value) and 0.0 <= value <= upper):
            raise ConfigError(
                f"config key 'data.{key}' must be between 0 (off) and {upper}; got {value!r}"
            )


def _validate_model(cfg: Config) -> None:
    m = cfg.model
    if not m.weights:
        raise ConfigError("config key 'model.weights' must be none, imagenet or a file path")
    for key in ("width", "blocks_per_stage"):
        _positive(f"model.{key}", getattr(m, key))
    _in_range("model.drop_path", m.drop_path, 0.0, 1.0, " (a probability; 0 = off, 0.05-0.2)")
    try:  # what the architecture supports: its registry spec says
        registry.check(m)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _in_range("model.bn_momentum", m.bn_momentum, 0.0, 1.0, " (0.9 default, 0.99 Keras')")
    if m.box_head and not datasets.dataset(cfg.dataset).has_boxes:
        with_boxes = [n for n in datasets.names() if datasets.dataset(n).has_boxes]
        raise ConfigError(
            f"config key 'model.box_head' learns fracture boxes, which {cfg.dataset!r} records "
            f"do not carry: set model.box_head=false (datasets with boxes: {with_boxes})"
        )
    if m.meta_head and not datasets.dataset(cfg.dataset).learnable_meta:
        raise ConfigError(
            f"config key 'model.meta_head' learns a dataset's metadata columns, which "
            f"{cfg.dataset!r} records do not carry (or carry as placeholders): set "
            "model.meta_head=false"
        )


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    _positive("train.epochs", t.epochs)
    _positive("train.batch_size", t.batch_size)
    for key, value, upper, why in (
        ("train.epochs", t.epochs, MAX_EPOCHS, "the recipe trains 24; a larger number is a typo"),
        ("train.batch_size", t.batch_size, MAX_BATCH, "larger batches do not fit in memory"),
    ):
        if value > upper:
            raise ConfigError(f"config key {key!r} must be at most {upper} ({why}); got {value!r}")
    _positive("train.learning_rate", t.learning_rate)
    _in_range("train.momentum", t.momentum, 0.0, 1.0)
    _in_range("train.weight_decay", t.weight_decay, 0.0, math.inf)
    _in_range("train.warmup_epochs", t.warmup_epochs, 0.0, t.epochs, " (below train.epochs)")
    _in_range("train.label_smoothing", t.label_smoothing, 0.0, 1.0)
    _in_range("train.mixup", t.mixup, 0.0, math.inf, " (Beta's alpha; 0 = off, 0.2-0.4 usual)")
    _in_range("train.box_paste", t.box_paste, 0.0, 1.0, " (a probability; 0 = off)", closed=True)
    if t.box_paste and not cfg.model.box_head:
        raise ConfigError(
            "config key 'train.box_paste' pastes fracture boxes, which reach training only "
            "with model.box_head=true: set it, or remove train.box_paste"
        )
    _in_range(
        "train.fracture_fill", t.fracture_fill, 0.0, 1.0, " (a probability; 0 = off)", closed=True
    )
    if t.fracture_fill and not cfg.model.box_head:
        raise ConfigError(
            "config key 'train.fracture_fill' fills fracture boxes, which reach training only "
            "with model.box_head=true: set it, or remove train.fracture_fill"
        )
    if t.box_target != "box" and not cfg.model.box_head:
        raise ConfigError(
            f"config key 'train.box_target' ({t.box_target!r}) says what the box heat map "
            "learns, which only a model with model.box_head=true has: set it, or remove "
            "train.box_target"
        )
    if t.box_loss != "bce" and not cfg.model.box_head:
        raise ConfigError(
            f"config key 'train.box_loss' ({t.box_loss!r}) is the loss of the box heat map, "
            "which only a model with model.box_head=true has: set it, or remove train.box_loss"
        )
    _in_range("train.box_loss_weight", t.box_loss_weight, 0.0, math.inf)
    _in_range("train.meta_loss_weight", t.meta_loss_weight, 0.0, math.inf)
    _positive("train.early_stopping_patience", t.early_stopping_patience, optional=True)
    _in_range(
        "train.ema_momentum", t.ema_momentum, 0.0, 1.0, " (0 = no averaging; 0.99-0.999 usual)"
    )
    _positive("train.steps_per_epoch", t.steps_per_epoch, optional=True)
    _positive("train.checkpoint_every_steps", t.checkpoint_every_steps, optional=True)


def allowed_keys() -> list[str]:
    """Every dotted key, for ``--help`` texts."""
    keys: list[str] = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            else:
                keys.append(f"{prefix}{f.name}")

    walk(Config(), "")
    return keys


@dataclass
class KeyInfo:
    """One config key as ``kerasfrac train --list-keys`` shows it."""

    key: str
    type: str
    default: Any
    allowed: tuple[str, ...] | None
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comment lines above each field of a config dataclass, joined."""
    import inspect

    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
        elif re.match(r"^\w+\s*:", text) and not text.startswith(("class", "def")):
            docs[text.split(":")[0].strip()] = " ".join(pending)
            pending = []
        elif text and not text.startswith("#"):
            pending = []
    return docs


def describe_keys() -> list[KeyInfo]:
    """Every config key with its type, default, allowed values and comment, read from the
    dataclasses above (and ``choices()``); a model key that only some architectures read says
    which (their registry specs)."""
    rows: list[KeyInfo] = []
    allowed = choices()
    owners = {
        f"model.{key}": registry.reading(key)
        for key in (f.name for f in dataclasses.fields(ModelConfig))
        if key not in registry.COMMON_KEYS
    }

    def walk(obj: Any, prefix: str) -> None:
        docs = _field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, f"{key}.")
            else:
                doc = docs.get(f.name, "")
                if key in owners:
                    doc = f"[{', '.join(owners[key]) or 'no architecture'} only] {doc}"
                if key == "model.name":  # each registered architecture with its summary
                    specs = map(registry.architecture, registry.names())
                    doc += "".join(f"\n      {s.name}: {s.summary}" for s in specs)
                rows.append(KeyInfo(key, str(f.type), value, allowed.get(key), doc))

    walk(Config(), "")
    return rows


def keys_table() -> str:
    """``describe_keys`` as text: one key a line, then its comment indented."""
    lines = ["Config keys (set in a YAML file or with --set KEY=VALUE):"]
    for k in describe_keys():
        allowed = f"  one of: {', '.join(k.allowed)}" if k.allowed else ""
        default = "null" if k.default is None else repr(k.default)
        lines.append(f"{k.key}  ({k.type}, default {default}){allowed}")
        if k.doc:
            lines.append(f"    {k.doc}")
    return "\n".join(lines)
