"""kerasfrac: bone-fracture classification on X-rays with TensorFlow/Keras.

Modules, one stage of the flow each (README "Data flow" has the whole map): ``config`` (typed
run configuration), ``data`` (tf.data pipelines over a build), ``model`` (the paper's CNN and
other named architectures), ``train``, ``runs`` (the run directory), ``metrics``,
``evaluate``, ``explain``, ``options`` (the commands' options), ``cli``.

Importing the package itself is cheap: TensorFlow is only imported by the modules that need it,
so ``kerasfrac.config`` can validate a run before any heavy work starts.
"""

__version__ = "0.1.0"
