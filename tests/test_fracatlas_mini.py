"""Integration: build the real FracAtlas subset in ../shared/data/fracatlas-mini
(or the folder ``KERASFRAC_FRACATLAS_MINI`` names).

Skips with a reason where that folder is absent (users do not have it), unless
``KERASFRAC_REQUIRE_DATA=1``: then a missing folder fails every test here (``.ci/run`` sets it
wherever the folder exists, so a moved or damaged subset cannot turn into skips).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tfrecords_builder import read_split
from tfrecords_builder.build import BuildOptions, build

_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fracatlas-mini"
MINI = Path(os.environ.get("KERASFRAC_FRACATLAS_MINI") or _DEFAULT)
_REQUIRED = os.environ.get("KERASFRAC_REQUIRE_DATA") == "1"

pytestmark = pytest.mark.skipif(
    not MINI.is_dir() and not _REQUIRED, reason=f"real FracAtlas subset not present at {MINI}"
)


@pytest.fixture(autouse=True)
def _required_data_present():
    if not MINI.is_dir():  # only reached with KERASFRAC_REQUIRE_DATA=1
        pytest.fail(f"KERASFRAC_REQUIRE_DATA=1 but the real FracAtlas subset is absent: {MINI}")


@pytest.fixture(scope="module")
def mini_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("mini") / "fracatlas"
    return out, build("fracatlas", MINI, out, BuildOptions(progress=False))


def test_manifest_matches_folder(mini_build):
    out, m = mini_build
    on_disk = {
        label: sorted(p.name for p in (MINI / "images" / folder).iterdir() if p.is_file())
        for label, folder in ((1, "Fractured"), (0, "Non_fractured"))
    }
    assert m["found"]["fractured"] == len(on_disk[1]) == 168
    assert m["found"]["normal"] == len(on_disk[0]) == 416
    for name in ("fractured", "normal", "total"):
        assert m["accounting"][name]["balanced"]
    # The subset's truncated JPEGs are exactly what TF rejects; they are quarantined.
    reasons = {q["file"]: q["reason"] for q in m["quarantined"]}
    assert reasons and all(r.startswith("truncated JPEG") for r in reasons.values())
    assert m["written"]["total"] == 584 - len(reasons)
    # Byte-identical duplicates exist in the subset and each group sits in one split.
    assert m["duplicate_summary"]["groups"] >= 1
    splits_of = {}
    with (out / "index.csv").open() as f:
        for row in csv.DictReader(f):
            splits_of[row["file"]] = row["split"]
    for g in m["duplicate_groups"]:
        assert len({splits_of[f] for f in g["files"]}) == 1


def test_boxes_and_metadata_from_the_real_annotations(mini_build):
    out, m = mini_build
    coco = json.loads((MINI / "Annotations" / "COCO JSON" / "COCO_fracture_masks.json").read_text())
    boxes_per_file = {}
    ids = {im["id"]: im["file_name"] for im in coco["images"]}
    for ann in coco["annotations"]:
        name = ids[ann["image_id"]]
        boxes_per_file[name] = boxes_per_file.get(name, 0) + 1
    seen = 0
    for split in ("train", "val", "test"):
        for r in read_split(out, split, decode=False).as_numpy_iterator():
            name = r["image_id"].decode()
            assert r["boxes"].shape[0] == boxes_per_file.get(name, 0)
            assert (r["boxes"] >= 0).all() and (r["boxes"] <= 1).all()
            if r["boxes"].shape[0]:
                assert (r["boxes"][:, 2] > r["boxes"][:, 0]).all()
                seen += 1
            assert r["meta"]["fractured"] in (0, 1)
    quarantined = {Path(q["file"]).name for q in m["quarantined"]}
    assert seen == len(set(boxes_per_file) - quarantined) > 100


def test_header_sizes_equal_pillows_for_every_real_file():
    """The builder's own JPEG/PNG header reader (the decompression-bomb guard) on real files."""
    import io

    from PIL import Image

    from tfrecords_builder import validation

    files = sorted((MINI / "images").rglob("*.jpg"))
    assert len(files) == 584
    for path in files:
        data = path.read_bytes()
        size = validation.image_size(data, validation.sniff(data))
        assert size == Image.open(io.BytesIO(data)).size, path.name


def test_every_reencoded_pair_shares_a_split_and_conflicts_are_quarantined(mini_build):
    """The default build groups near-duplicates: every pair the pixel check calls one image
    sits in one split (or is quarantined as a label conflict), and no pair straddles splits."""
    out, m = mini_build
    n = m["near_duplicates"]
    assert n["grouped"] and n["same_image_pairs"] >= 1
    assert m["near_duplicates_across_splits"] == []
    with (out / "index.csv").open() as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    quarantined = {q["file"]: q["reason"] for q in m["quarantined"]}
    for p in n["pair_list"]:
        if p["a"] in quarantined or p["b"] in quarantined:
            continue
        assert rows[p["a"]]["split"] == rows[p["b"]]["split"], p
        assert rows[p["a"]]["group"] == rows[p["b"]]["group"], p
    for c in n["conflict_pairs"]:
        assert c["labels"][0] != c["labels"][1] and c["agreement"] >= 0.9
        for f in (c["a"], c["b"]):
            assert quarantined[f].startswith("conflict: near-duplicate")


@pytest.mark.slow
def test_tfds_reads_the_real_build_as_read_split_does(mini_build):
    """The real subset through TFDS: same records in the same order (bytes compared, not
    decoded: 584 X-rays up to 2880 px), boxes as BBoxFeature, metadata in as_dataframe,
    slices of the stratified split counts."""
    import tensorflow_datasets as tfds

    from tests.test_tfds import assert_same_examples

    out, m = mini_build
    builder = tfds.builder_from_directory(out)
    skip = {"image": tfds.decode.SkipDecoding()}
    order = tfds.ReadConfig(interleave_cycle_length=1)  # shards one after the other
    for split in ("train", "val", "test"):
        assert builder.info.splits[split].num_examples == sum(m["splits"][split].values())
        assert_same_examples(
            list(tfds.as_numpy(builder.as_dataset(split=split, decoders=skip, read_config=order))),
            list(read_split(out, split, decode=False).as_numpy_iterator()),
        )
    n_test = sum(m["splits"]["test"].values())
    assert len(list(builder.as_dataset(split="test[:50%]", decoders=skip))) == round(n_test / 2)
    assert "Abedeen" in builder.info.citation and "Scientific Data" in builder.info.citation
    assert builder.info.redistribution_info.license == "CC BY 4.0"
    frame = tfds.as_dataframe(builder.as_dataset(split="test[:20]", decoders=skip), builder.info)
    for column in ("meta/hand", "meta/hardware", "meta/fracture_count", "file", "group"):
        assert column in frame.columns, column
    assert set(frame["meta/hand"]) <= {0, 1} and len(frame) == 20


def test_tfds_load_prepares_the_same_real_build_offline(mini_build, tmp_path, monkeypatch):
    import socket

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import gcs_utils

    import tfrecords_builder.tfds_builders  # noqa: F401  (registers fracatlas)
    from tests.test_tfds import _no_network

    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)
    out, m = mini_build
    builder = tfds.builder(
        "fracatlas", data_dir=tmp_path / "tfds", options=BuildOptions(progress=False)
    )
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MINI))
    prepared = tmp_path / "tfds" / "fracatlas" / "1.0.0"
    there = json.loads((prepared / "manifest.json").read_text())
    assert there["shards"] == m["shards"] and there["quarantined"] == m["quarantined"]
    names = [n for names in m["shards"].values() for n in names]
    assert len(names) == 24
    for name in names:
        assert (prepared / name).read_bytes() == (out / name).read_bytes(), name
