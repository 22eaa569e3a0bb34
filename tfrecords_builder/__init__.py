"""Turn FracAtlas, Tibia/Fibula or synthetic phantoms into sharded TFRecords with a manifest."""

from tfrecords_builder.reader import BuildOutputError, load_manifest, read_split, shard_files

__all__ = ["BuildOutputError", "load_manifest", "read_split", "shard_files"]
