"""The dataset layouts ``kerasfrac build`` reads, by name: one ``DatasetSpec`` each.

A spec holds everything the builder and the TFDS glue need to know about a dataset: how to
find its files, labels, boxes and metadata in a source folder (``find``), the TFDS name and
information, and what its records carry. The builder, its command line, the TFDS builders
(``tfrecords_builder.tfds_builders``) and kerasfrac's config all read the registry, so a new
dataset is one module and one ``register_dataset`` call (docs/extending.md). TensorFlow-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tfrecords_builder.candidates import Found
from tfrecords_builder.metadata import MetaColumn
from tfrecords_builder.registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    #: ``kerasfrac build NAME`` and the config's ``dataset``
    name: str
    #: find(root: Path) -> Found: every candidate file with its label, boxes and metadata;
    #: with ``takes_options`` find(root, opts: BuildOptions), with ``listing`` find(root,
    #: opts, listing: Path)
    find: Callable[..., Found]
    #: the TFDS builder's name (``tfds.load(NAME)``), which also names the shard files
    tfds_name: str
    #: one paragraph for dataset_info.json
    description: str
    homepage: str = ""
    citation: str = ""
    license: str = "CC BY 4.0"
    #: what ``tfds.load`` users are told to put in ``manual_dir``
    manual_download: str = ""
    #: channels of the TFDS image feature (1 grayscale; 3 for sets that mix)
    image_channels: int = 3
    #: the TFDS image feature's encoding where every file has one (None: as stored)
    encoding_format: str | None = None
    #: records carry the metadata columns (``defaults.META_COLUMNS``; -1 = unknown)
    with_meta: bool = False
    #: ``model.meta_head`` may learn those columns (they describe real acquisitions)
    learnable_meta: bool = False
    #: records can carry fracture boxes (``model.box_head`` is refused on datasets without)
    has_boxes: bool = False
    #: find reads fracture boxes from ``--boxes`` (COCO JSON or YOLO files, ``boxes.attach``)
    boxes_option: bool = False
    #: find also reads the build options (label names, official split, ...)
    takes_options: bool = False
    #: the source is a file listing the images (e.g. "csv"), which lie under
    #: ``--image-root`` (a folder or .zip; default the listing's folder)
    listing: str = ""
    #: source columns that restate the label: never kept as metadata (metadata.csv)
    label_columns: tuple[str, ...] = ()
    #: the metadata columns the layout's candidates carry in ``extra`` (metadata.csv): each
    #: one's kind and whether ``model.meta_head`` learns it (``tfrecords_builder.metadata``);
    #: a layout whose columns come from the source (a CSV) declares them in ``Found.metadata``
    metadata: tuple[MetaColumn, ...] = ()
    #: the metadata column that names the body region (evaluation's ``region=`` subgroups)
    region_column: str = ""


_REGISTRY: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add ``spec`` to the registry (``replace=True`` to redefine a name); returns it."""
    if not spec.tfds_name.isidentifier() or spec.tfds_name != spec.tfds_name.lower():
        raise ValueError(
            f"dataset {spec.name!r}: tfds_name must be a lower-case identifier (TFDS' rule); "
            f"got {spec.tfds_name!r}"
        )
    taken = [s.name for s in _REGISTRY.specs() if s.tfds_name == spec.tfds_name]
    if taken and taken != [spec.name]:
        raise ValueError(f"tfds_name {spec.tfds_name!r} is taken by dataset {taken[0]!r}")
    return _REGISTRY.add(spec.name, spec, replace)


#: Remove a dataset (tests that register one of their own clean up with it).
unregister_dataset = _REGISTRY.remove
#: The registered dataset names, in registration order.
names = _REGISTRY.names
#: The spec of a name; an unknown name is an error listing the registered ones.
dataset = _REGISTRY.get


def by_tfds_name(tfds_name: str) -> DatasetSpec:
    """The spec whose TFDS builder is called ``tfds_name``."""
    for spec in _REGISTRY.specs():
        if spec.tfds_name == tfds_name:
            return spec
    raise ValueError(f"no registered dataset has the TFDS name {tfds_name!r}")
