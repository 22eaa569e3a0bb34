"""The dataset layouts the builder reads: one module per dataset, each registering its
``DatasetSpec`` (``registry``). Importing this package registers the built-in ones, in the
order ``kerasfrac build --help`` lists them. TensorFlow-free."""

from tfrecords_builder.datasets import (  # noqa: F401
    csvlist,
    folder,
    fracatlas,
    grazpedwri,
    mura,
    synthetic,
    tibia_fibula,
)
from tfrecords_builder.datasets.registry import (
    DatasetSpec,
    by_tfds_name,
    dataset,
    names,
    register_dataset,
    unregister_dataset,
)

__all__ = [
    "DatasetSpec",
    "by_tfds_name",
    "dataset",
    "names",
    "register_dataset",
    "unregister_dataset",
]
