"""The builder's names and default limits, importable without TensorFlow.

The command line reads them to describe its options; ``kerasfrac`` builds its parser before
it decides how TensorFlow is configured (``kerasfrac.training.kernels``), so nothing here may import
TensorFlow.
"""

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
#: 2: the build is a tensorflow-datasets dataset (1: Model Garden-style shards, own keys).
FORMAT_VERSION = 2
#: FracAtlas' dataset.csv columns kept per image (all 0/1 flags except fracture_count).
#: ``fractured`` is the csv's own opinion; the record's ``label`` comes from the folder.
META_COLUMNS = (
    "hand",
    "leg",
    "hip",
    "shoulder",
    "mixed",
    "hardware",
    "multiscan",
    "fractured",
    "fracture_count",
    "frontal",
    "lateral",
    "oblique",
)
#: The META_COLUMNS that ``model.meta_head`` learns to predict from the image: body region,
#: hardware, multiscan and view. ``fractured`` and ``fracture_count`` restate the label and are
#: never targets.
META_TARGETS = tuple(c for c in META_COLUMNS if c not in ("fractured", "fracture_count"))
#: Perceptual-hash distance (bits of 64) at or below which two images are near-duplicates.
#: Chosen on the full FracAtlas (``python -m tfrecords_builder.near_duplicate_study``; the
#: figures are in docs/data.md, "Near-duplicates").
DEFAULT_NEAR_DISTANCE = 4
#: The pixel-level check of a near-duplicate pair: both images in grayscale, area-resized to
#: PIXEL_CHECK_SIZE x PIXEL_CHECK_SIZE; the pair is the same image when at least
#: PIXEL_AGREEMENT of the pixels differ by at most PIXEL_TOLERANCE grey levels (of 255).
#: On the full FracAtlas the agreement of pairs within 12 bits is bimodal: copies (a copy
#: with a grey band at the bottom included) agree on >= 0.918 of the pixels, the next pairs
#: on <= 0.89 (IMG0003102 vs IMG0003482, the hash's false pair at 2 bits: 0.08).
PIXEL_CHECK_SIZE = 128
PIXEL_TOLERANCE = 8
PIXEL_AGREEMENT = 0.9
#: Two images whose height/width ratios differ by more than this are never near-duplicates
#: (the hash squashes every image to a square, so aspect and orientation are invisible to it).
ASPECT_TOLERANCE = 0.02
#: Images above this many pixels are quarantined unread (decompression bombs); FracAtlas'
#: largest are 2304x2880 = 6.6M pixels.
DEFAULT_MAX_PIXELS = 60_000_000
