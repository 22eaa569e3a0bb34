"""The data stage: ``decode`` (bytes -> the model's input), ``augment`` (per-image and per-batch
augmentation) and ``pipeline`` (the tf.data pipelines over a build). The names below are
re-exported, so ``from kerasfrac import data; data.make_dataset(...)`` works."""

from kerasfrac.data.augment import (  # noqa: F401
    BATCH_OPS,
    IMAGE_OPS,
    BatchOp,
    ImageOp,
    apply_batch_ops,
    augment_batch,
    augment_image,
    augments,
    box_mask,
    box_paste,
    box_paste_draw,
    draw_params,
    flip_expand,
    fracture_fill,
    fracture_fill_draw,
    mixup,
    mixup_box_weights,
    mixup_draw,
    mixup_lambdas,
    random_flip,
)
from kerasfrac.data.decode import (  # noqa: F401
    JPEG_MARGIN,
    JPEG_RATIOS,
    decode_resize,
    image_shape,
    letterbox,
    preprocess,
    to_float,
)
from kerasfrac.data.pipeline import (  # noqa: F401
    AUTOTUNE,
    CACHE_FORMAT,
    Build,
    BuildOutputError,
    SplitRecords,
    cache_bytes_per_image,
    check_build,
    epoch_images,
    make_dataset,
    make_eval_dataset,
    split_records,
    steps_per_epoch,
)
