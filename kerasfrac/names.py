"""The names kerasfrac's settings may take, importable without TensorFlow.

``config`` validates against them before anything heavy is imported; ``data`` and ``model``
check the same tuples, so each list of names is written once, here. The builder's names
(datasets, metadata columns) live in ``tfrecords_builder.defaults``.
"""

from tfrecords_builder.defaults import SPLITS

__all__ = [
    "BOX_STRIDES",
    "BOX_LOSSES",
    "BOX_TARGETS",
    "CELL_HEADS",
    "CLASS_WEIGHTS",
    "DISTRIBUTES",
    "FLIPS",
    "HEADS",
    "N_BOOTSTRAP",
    "OPTIMIZERS",
    "PRECISIONS",
    "RESIZES",
    "SCHEDULES",
    "SELECTS",
    "SPLITS",
    "CAM_METHODS",
    "CAM_TARGETS",
    "TTAS",
]

FLIPS = ("none", "expand", "random")
RESIZES = ("stretch", "pad")

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")
SELECTS = ("last", "best")
TTAS = ("none", "flip")
HEADS = ("gap", "avgmax", "heatmap", "attention", "presence")
#: The heads that read the box heat map's cells (so the model has them with or without
#: model.box_head).
CELL_HEADS = ("heatmap", "attention", "presence")
#: resnet_small's box heat map: one cell per 32 px (the last feature map), per 16 px, or per
#: 8 px (a light FPN-style decoder over stages 2-4: the dense mask head).
BOX_STRIDES = (32, 16, 8)
#: What the box heat map learns: the cells a fracture box touches, or those its outline
#: (FracAtlas' polygon) covers.
BOX_TARGETS = ("box", "outline")
#: The loss of the box heat map: per-cell BCE, or BCE plus soft Dice (a segmentation loss that
#: a few positive cells among hundreds cannot be averaged away in).
BOX_LOSSES = ("bce", "bce_dice")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
DISTRIBUTES = ("auto", "none", "mirrored", "multi_worker")
#: Bootstrap resamples of every confidence interval (evaluate, audit, kerasfrac.evaluation.metrics).
N_BOOTSTRAP = 1000
#: Class-activation maps (kerasfrac.explain.gradcam): the methods, and the class a map explains.
#: ``boxmap`` is no gradient method: the model's own box heat map (model.box_head).
CAM_METHODS = ("gradcam", "hirescam", "boxmap")
CAM_TARGETS = ("label", "predicted", "fractured", "normal")
