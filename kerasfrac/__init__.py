"""kerasfrac: bone-fracture classification on X-rays with TensorFlow/Keras.

One package per stage of the flow (docs/layout.md has the whole map): ``data`` (decode,
augment, tf.data pipelines over a build) -> ``models`` (registered architectures) ->
``training`` (the task, its step, checkpoints) -> the run directory (``runs``) ->
``evaluation`` (metrics, evaluate, audit, plots, report) -> ``explain``; ``predict``,
``bench`` and ``demo`` apply them; ``config``, ``options`` and ``cli`` are the face.

Importing the package itself is cheap: TensorFlow is only imported by the modules that need it,
so ``kerasfrac.config`` can validate a run before any heavy work starts.
"""

__version__ = "0.1.0"


def load(path, operating_point: str | None = None):
    """A trained run directory or an export as one object with ``predict(paths or uint8
    arrays)`` and ``explain(path)``: see ``kerasfrac.api``."""
    from kerasfrac.api import load as _load

    return _load(path, operating_point)
