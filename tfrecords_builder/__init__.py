"""Turn FracAtlas, Tibia/Fibula or synthetic phantoms into tensorflow-datasets datasets
(sharded TFRecords, dataset_info.json) with a manifest; ``tfrecords_builder.tfds_builders``
registers them as TFDS builders.

``Build``, ``read_split``, ``load_manifest`` and ``shard_files`` are the contract later stages
use; they are imported lazily so that ``kerasfrac --help`` does not pay for importing
TensorFlow.
"""

__all__ = ["Build", "BuildOutputError", "load_manifest", "read_split", "shard_files"]


def __getattr__(name: str):
    if name in __all__:
        from tfrecords_builder import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'tfrecords_builder' has no attribute {name!r}")
