"""The builder's names and default limits, importable without TensorFlow.

The command line reads them to describe its options; ``kerasfrac`` builds its parser before
it decides how TensorFlow is configured (``kerasfrac.kernels``), so nothing here may import
TensorFlow.
"""

DATASETS = ("fracatlas", "tibia-fibula", "synthetic")
#: Perceptual-hash distance (bits of 64) at or below which two images are near-duplicates.
DEFAULT_NEAR_DISTANCE = 4
#: Images above this many pixels are quarantined unread (decompression bombs); FracAtlas'
#: largest are 2304x2880 = 6.6M pixels.
DEFAULT_MAX_PIXELS = 60_000_000
