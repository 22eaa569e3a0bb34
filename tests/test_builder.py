"""The TFRecord builder: accounting, quarantine, duplicates, splits, round trip, safety."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import sources
from tfrecords_builder import load_manifest, read_split, validation, writer
from tfrecords_builder.archive import SourceError
from tfrecords_builder.build import BuildOptions, build

OPTS = dict(progress=False, shards=3)


def index_rows(out: Path) -> list[dict]:
    with (out / "index.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def fracatlas_build(tmp_path_factory):
    base = tmp_path_factory.mktemp("fa")
    expect = sources.make_fracatlas(base / "src")
    manifest = build("fracatlas", base / "src", base / "out", BuildOptions(**OPTS))
    return base, expect, manifest


def test_accounting_and_quarantine_reasons(fracatlas_build):
    base, expect, m = fracatlas_build
    assert m["found"]["fractured"] == expect["found"][1]
    assert m["found"]["normal"] == expect["found"][0]
    for name in ("fractured", "normal", "total"):
        a = m["accounting"][name]
        assert a["found"] == a["written"] + a["quarantined"] + a["dropped_duplicates"]
        assert a["balanced"]
    reasons = {q["file"]: q["reason"] for q in m["quarantined"]}
    assert set(reasons) == set(expect["quarantined"])
    for file, start in expect["quarantined"].items():
        assert reasons[file].startswith(start), (file, reasons[file])
    written = {r["file"] for r in index_rows(base / "out")}
    assert not written & set(reasons)
    assert m["written"]["total"] == len(written)
    split_total = sum(c["fractured"] + c["normal"] for c in m["splits"].values())
    assert split_total == m["written"]["total"]


def test_duplicates_grouped_into_one_split(fracatlas_build):
    base, expect, m = fracatlas_build
    groups = [g for g in m["duplicate_groups"] if not g["conflict"]]
    assert [g["files"] for g in groups] == expect["duplicates"]
    rows = {r["file"]: r for r in index_rows(base / "out")}
    for files in expect["duplicates"]:
        assert len({rows[f]["split"] for f in files}) == 1
        assert len({rows[f]["group"] for f in files}) == 1
    conflicts = [g for g in m["duplicate_groups"] if g["conflict"]]
    assert len(conflicts) == 1 and len(conflicts[0]["files"]) == 2


def test_label_disagreement_listed_and_folder_wins(fracatlas_build):
    base, expect, m = fracatlas_build
    assert [d["file"] for d in m["label_disagreements"]] == expect["disagreements"]
    rows = {r["file"]: r for r in index_rows(base / "out")}
    assert rows["images/Fractured/IMG0000002.jpg"]["label"] == "1"


def test_splits_stratified_disjoint_and_complete(fracatlas_build):
    base, _, m = fracatlas_build
    out = base / "out"
    per_class = {"fractured": 0, "normal": 0}
    for counts in m["splits"].values():
        for k in per_class:
            per_class[k] += counts[k]
    for split, ratio in m["split_ratios"].items():
        for k, total in per_class.items():
            assert abs(m["splits"][split][k] - ratio * total) <= 1, (split, k, m["splits"])
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        records = list(read_split(out, split, decode=False).as_numpy_iterator())
        labels = [int(r["label"]) for r in records]
        assert labels.count(1) == m["splits"][split]["fractured"]
        assert labels.count(0) == m["splits"][split]["normal"]
        for r in records:
            sha = r["sha256"].decode()
            assert seen.setdefault(sha, split) == split, f"{sha} in {seen[sha]} and {split}"
        assert len(m["shards"][split]) == 3


def test_round_trip_pixels_boxes_and_metadata(fracatlas_build):
    base, expect, _ = fracatlas_build
    src = base / "src"
    checked = 0
    for split in ("train", "val", "test"):
        for r in read_split(base / "out", split).as_numpy_iterator():
            image_id = r["image_id"].decode()
            folder = "Fractured" if r["label"] == 1 else "Non_fractured"
            path = src / "images" / folder / image_id
            assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"].decode()
            decoded = np.asarray(Image.open(path))
            image = r["image"][..., 0] if decoded.ndim == 2 else r["image"]
            # TF's and Pillow's libjpeg may differ by one level in IDCT rounding.
            assert image.shape == decoded.shape
            assert np.abs(image.astype(int) - decoded.astype(int)).max() <= 1
            assert r["height"] == decoded.shape[0] and r["width"] == decoded.shape[1]
            if r["label"] == 1 and image_id.startswith("IMG000"):
                np.testing.assert_allclose(r["boxes"], [[0.5, 0.25, 0.75, 0.75]], atol=1e-6)
                assert r["meta"]["fracture_count"] == 1
            else:
                assert r["boxes"].shape == (0, 4)
            assert r["meta"]["leg"] in (0, 1)
            checked += 1
    assert checked == 60 + 1  # the images plus one copy of the duplicate pair


def test_png_round_trip_is_exact(tmp_path):
    sources.make_tibia(tmp_path / "src", "mendeley", copies=0)
    build("tibia-fibula", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    for split in ("train", "val", "test"):
        for r in read_split(tmp_path / "out", split).as_numpy_iterator():
            path = tmp_path / "src" / r["image_id"].decode()
            np.testing.assert_array_equal(r["image"][..., 0], np.asarray(Image.open(path)))


def test_same_seed_same_splits_other_seed_differs(tmp_path):
    sources.make_fracatlas(tmp_path / "src", defects=False, n_fractured=15, n_normal=30)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        build("fracatlas", tmp_path / "src", tmp_path / name, BuildOptions(seed=seed, **OPTS))
    a, b, c = (index_rows(tmp_path / n) for n in "abc")
    assert a == b
    assert [r["split"] for r in a] != [r["split"] for r in c]
    shards_a = sorted((tmp_path / "a").glob("fracatlas-*.tfrecord-*-of-*"))
    shards_b = sorted((tmp_path / "b").glob("fracatlas-*.tfrecord-*-of-*"))
    assert len(shards_a) == 9 and [p.name for p in shards_a] == [p.name for p in shards_b]
    assert [p.read_bytes() for p in shards_a] == [p.read_bytes() for p in shards_b]
    for name in ("dataset_info.json", "features.json"):  # TFDS' metadata: deterministic too
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_drop_duplicates_keeps_one(tmp_path):
    expect = sources.make_tibia(tmp_path / "src", "mendeley", copies=3)
    m = build(
        "tibia-fibula",
        tmp_path / "src",
        tmp_path / "out",
        BuildOptions(drop_duplicates=True, **OPTS),
    )
    assert m["found"]["fractured"] == expect["found"][1]
    assert len(m["dropped_duplicates"]) == 3
    assert m["written"]["fractured"] == expect["found"][1] - 3
    assert m["accounting"]["fractured"]["balanced"]
    assert m["duplicate_summary"]["groups"] == 3
    assert m["duplicate_summary"]["files_in_groups"] == 6
    shas = [r["sha256"] for r in index_rows(tmp_path / "out")]
    assert len(shas) == len(set(shas))


@pytest.mark.parametrize("spelling", ["mendeley", "mirror"])
def test_tibia_both_spellings_png_and_jpeg(tmp_path, spelling):
    expect = sources.make_tibia(tmp_path / "src", spelling)
    m = build("tibia-fibula", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert m["found"]["fractured"] == expect["found"][1]
    assert m["found"]["normal"] == expect["found"][0]
    assert m["quarantined"] == []
    assert m["duplicate_summary"]["groups"] == 3
    formats = {
        r["format"]
        for s in ("train", "val", "test")
        for r in read_split(tmp_path / "out", s, decode=False).as_numpy_iterator()
    }
    assert formats == ({b"png", b"jpeg"} if spelling == "mirror" else {b"png"})


def test_recover_truncated_keeps_lossless_png(tmp_path):
    sources.make_fracatlas(tmp_path / "src", n_fractured=4, n_normal=6)
    m = build(
        "fracatlas",
        tmp_path / "src",
        tmp_path / "out",
        BuildOptions(recover_truncated=True, **OPTS),
    )
    assert m["recovered_truncated"] == ["images/Non_fractured/IMG9000001.jpg"]
    assert "images/Non_fractured/IMG9000001.jpg" not in {q["file"] for q in m["quarantined"]}
    found = [
        r
        for s in ("train", "val", "test")
        for r in read_split(tmp_path / "out", s).as_numpy_iterator()
        if r["image_id"] == b"IMG9000001.jpg"
    ]
    assert len(found) == 1 and found[0]["format"] == b"png"
    assert found[0]["image"].shape == (64, 64, 1)


def test_too_large_image_is_quarantined_not_a_crash(tmp_path):
    sources.make_tibia(tmp_path / "src", "mendeley", copies=0)
    big = np.zeros((600, 600), np.uint8)
    (tmp_path / "src" / "normal" / "big.png").write_bytes(sources.encode(big, "PNG"))
    m = build(
        "tibia-fibula", tmp_path / "src", tmp_path / "out", BuildOptions(max_pixels=100_000, **OPTS)
    )
    assert [q["file"] for q in m["quarantined"]] == ["normal/big.png"]
    assert m["quarantined"][0]["reason"].startswith("too large")


def test_near_duplicates_grouped_by_default_and_reported_only_when_asked(tmp_path):
    sources.make_tibia(tmp_path / "src", "mendeley", n_fractured=30, n_normal=6, copies=0)
    frac = tmp_path / "src" / "fracture"
    originals = sorted(frac.iterdir())
    for i, src in enumerate(originals[:10]):  # re-encoded copies: different bytes, same picture
        Image.open(src).save(frac / f"reenc{i}.jpg", quality=90)
    m = build(
        "tibia-fibula",
        tmp_path / "src",
        tmp_path / "a",
        BuildOptions(group_near_duplicates=False, **OPTS),
    )
    assert m["near_duplicate_pairs"] >= 10
    assert m["duplicate_summary"]["groups"] == 0
    across = m["near_duplicates_across_splits"]
    assert across, "10 near-duplicate pairs should not all land together by chance"
    assert m["near_duplicates"]["grouped"] is False
    m = build("tibia-fibula", tmp_path / "src", tmp_path / "b", BuildOptions(**OPTS))
    assert m["near_duplicates_across_splits"] == []
    n = m["near_duplicates"]
    assert n["grouped"] is True and n["same_image_pairs"] >= 10
    assert n["groups_merged"] >= 10 and n["images_in_merged_groups"] >= 20
    split_of = {r["file"]: r["split"] for r in index_rows(tmp_path / "b")}
    for i, src in enumerate(originals[:10]):
        assert split_of[f"fracture/reenc{i}.jpg"] == split_of[f"fracture/{src.name}"]


def _portrait(rng) -> np.ndarray:
    """A 64x48 image with structure at every scale (blocks and a gradient)."""
    blocks = np.kron(rng.integers(0, 160, size=(8, 6)), np.ones((8, 8)))
    return (blocks + np.linspace(0, 80, 64)[:, None]).astype(np.uint8)


def test_near_duplicate_label_conflicts_need_the_pixel_check(tmp_path):
    """A re-encoded copy under the other label is quarantined (both files, naming each
    other); an image the hash cannot tell apart but whose pixels differ (brightness +40) is
    kept and grouped; a landscape image of the same hash (another aspect) is no pair at all."""
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    sources.make_tibia(src, "mendeley", n_fractured=8, n_normal=8, copies=0)
    same, bright = _portrait(rng), _portrait(rng)
    blocks = rng.integers(0, 256, size=(8, 8))  # 8x8 blocks as 64x48 and as 48x64: one hash
    tall = np.kron(blocks, np.ones((8, 6))).astype(np.uint8)
    wide = np.kron(blocks, np.ones((6, 8))).astype(np.uint8)
    (src / "fracture" / "same_a.png").write_bytes(sources.encode(same, "PNG"))
    (src / "normal" / "same_b.jpg").write_bytes(sources.encode(same, "JPEG"))
    (src / "fracture" / "bright_a.png").write_bytes(sources.encode(bright, "PNG"))
    lighter = np.clip(bright.astype(int) + 40, 0, 255).astype(np.uint8)
    (src / "normal" / "bright_b.png").write_bytes(sources.encode(lighter, "PNG"))
    (src / "fracture" / "tall.png").write_bytes(sources.encode(tall, "PNG"))
    (src / "normal" / "wide.png").write_bytes(sources.encode(wide, "PNG"))

    m = build("tibia-fibula", src, tmp_path / "out", BuildOptions(**OPTS))
    reasons = {q["file"]: q["reason"] for q in m["quarantined"]}
    assert set(reasons) == {"fracture/same_a.png", "normal/same_b.jpg"}
    assert "normal/same_b.jpg" in reasons["fracture/same_a.png"]
    assert "fracture/same_a.png" in reasons["normal/same_b.jpg"]
    n = m["near_duplicates"]
    assert n["conflicts_quarantined"] == 2
    [conflict] = n["conflict_pairs"]
    assert {conflict["a"], conflict["b"]} == {"fracture/same_a.png", "normal/same_b.jpg"}
    pairs = {frozenset((p["a"], p["b"])): p for p in n["pair_list"]}
    bright_pair = pairs[frozenset(("fracture/bright_a.png", "normal/bright_b.png"))]
    assert bright_pair["distance"] <= n["distance"] and not bright_pair["same_image"]
    rows = {r["file"]: r for r in index_rows(tmp_path / "out")}
    assert rows["fracture/bright_a.png"]["group"] == rows["normal/bright_b.png"]["group"]
    assert validation.perceptual_hash(tall[..., None]) == validation.perceptual_hash(
        wide[..., None]
    )
    assert frozenset(("fracture/tall.png", "normal/wide.png")) not in pairs
    assert n["pairs_left_out_for_aspect"] >= 1
    assert n["mixed_label_groups"] >= 1
    for name in ("fractured", "normal", "total"):
        assert m["accounting"][name]["balanced"]

    # --no-group-near-duplicates: today's behaviour, nothing quarantined for it.
    m = build(
        "tibia-fibula", src, tmp_path / "off", BuildOptions(group_near_duplicates=False, **OPTS)
    )
    assert m["quarantined"] == []
    assert m["near_duplicates"]["conflict_pairs"][0]["quarantined"] is False


def test_groups_file_keeps_a_users_groups_in_one_split(tmp_path):
    src = tmp_path / "src"
    sources.make_tibia(src, "mendeley", n_fractured=20, n_normal=20, copies=0)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    patients = {f: f"patient{i % 4}" for i, f in enumerate(files)}  # 4 patients, 10 images each
    table = tmp_path / "groups.csv"
    table.write_text("file,group\n" + "".join(f"{f},{g}\n" for f, g in patients.items()))
    m = build("tibia-fibula", src, tmp_path / "out", BuildOptions(groups_file=str(table), **OPTS))
    assert m["user_groups"]["groups"] == 4 and m["user_groups"]["images_matched"] == 40
    rows = index_rows(tmp_path / "out")
    for patient in set(patients.values()):
        members = [r for r in rows if patients[r["file"]] == patient]
        assert len({r["split"] for r in members}) == 1
        assert len({r["group"] for r in members}) == 1

    bad = tmp_path / "bad.csv"
    bad.write_text("filename,patient\nx.png,1\n")
    with pytest.raises(ValueError, match="expected a 'group' column"):
        build("tibia-fibula", src, tmp_path / "b1", BuildOptions(groups_file=str(bad), **OPTS))
    bad.write_text("file,group\nnot/there.png,p1\n")
    with pytest.raises(ValueError, match="not/there.png"):
        build("tibia-fibula", src, tmp_path / "b2", BuildOptions(groups_file=str(bad), **OPTS))
    with pytest.raises(ValueError, match="no such file"):
        build(
            "tibia-fibula", src, tmp_path / "b3", BuildOptions(groups_file="/no/such.csv", **OPTS)
        )


def test_zip_source_equals_folder(tmp_path):
    sources.make_fracatlas(tmp_path / "FracAtlas", n_fractured=5, n_normal=8)
    archive = tmp_path / "FracAtlas.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted((tmp_path / "FracAtlas").rglob("*")):
            z.write(p, p.relative_to(tmp_path).as_posix())
    a = build("fracatlas", tmp_path / "FracAtlas", tmp_path / "a", BuildOptions(**OPTS))
    b = build("fracatlas", archive, tmp_path / "b", BuildOptions(**OPTS))
    assert a["splits"] == b["splits"] and a["quarantined"] == b["quarantined"]
    assert index_rows(tmp_path / "a") == index_rows(tmp_path / "b")
    assert not list(tmp_path.glob(".b.*")), "extraction scratch must be removed"


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/etc/evil.txt"])
def test_zip_slip_rejected(tmp_path, bad_name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("dataset.csv", "image_id\n")
        z.writestr(bad_name, "x")
    with pytest.raises(SourceError, match="absolute path or '..'"):
        build("fracatlas", archive, tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_wrong_source_errors_name_path_layout_and_contents(tmp_path):
    (tmp_path / "src" / "stuff").mkdir(parents=True)
    (tmp_path / "src" / "readme.txt").write_text("hi")
    with pytest.raises(SourceError) as err:
        build("fracatlas", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    text = str(err.value)
    assert str(tmp_path / "src") in text and "dataset.csv" in text and "readme.txt" in text
    with pytest.raises(SourceError, match="Tibia/Fibula.*fracture/ and normal/"):
        build("tibia-fibula", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    with pytest.raises(SourceError, match="does not exist"):
        build("fracatlas", tmp_path / "nope", tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_then_overwritten(tmp_path):
    sources.make_tibia(tmp_path / "src", "mendeley", copies=0)
    out = tmp_path / "out"
    build("tibia-fibula", tmp_path / "src", out, BuildOptions(**OPTS))
    before = (out / "manifest.json").read_text()
    with pytest.raises(writer.OutputExistsError, match="--overwrite"):
        build("tibia-fibula", tmp_path / "src", out, BuildOptions(seed=1, **OPTS))
    assert (out / "manifest.json").read_text() == before
    m = build("tibia-fibula", tmp_path / "src", out, BuildOptions(seed=1, overwrite=True, **OPTS))
    assert load_manifest(out)["seed"] == 1 == m["seed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_read_manifest_is_the_tolerant_reader(tmp_path):
    """The pages and tables that describe a run read its build's manifest tolerantly: the
    manifest where it is, None where the build is not configured, gone or damaged."""
    from tfrecords_builder.manifest import read_manifest

    sources.make_tibia(tmp_path / "src", "mendeley", copies=0)
    out = tmp_path / "out"
    build("tibia-fibula", tmp_path / "src", out, BuildOptions(seed=3, **OPTS))
    assert read_manifest(out) == load_manifest(out) and read_manifest(str(out))["seed"] == 3
    assert read_manifest(None) is None and read_manifest("") is None
    assert read_manifest(tmp_path / "gone") is None
    (out / "manifest.json").write_text("[1, 2")  # damaged
    assert read_manifest(out) is None
    (out / "manifest.json").write_text("[1, 2]")  # JSON, not an object
    assert read_manifest(out) is None


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    sources.make_tibia(tmp_path / "src", "mendeley", copies=0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        build("tibia-fibula", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_manifest_contract_keys(fracatlas_build):
    base, _, m = fracatlas_build
    on_disk = json.loads((base / "out" / "manifest.json").read_text())
    for key in (
        "source",
        "seed",
        "split_ratios",
        "found",
        "written",
        "quarantined",
        "duplicate_groups",
        "near_duplicates_across_splits",
        "label_disagreements",
        "splits",
        "shards",
    ):
        assert key in on_disk, key
    assert on_disk["source"] == "fracatlas" and on_disk["seed"] == 42
    assert set(on_disk["splits"]) == {"train", "val", "test"}


def test_bad_split_ratios_rejected():
    from tfrecords_builder.splits import parse_ratios

    assert parse_ratios("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    for bad in ("0.7,0.2", "0.5,0.5,0.5", "a,b,c", "0,0.5,0.5"):
        with pytest.raises(ValueError, match="--split"):
            parse_ratios(bad)


def test_groups_of_several_images_spread_over_the_splits():
    """Multi-image groups (duplicates) land in every split in proportion, not all in train;
    the singletons still fill each quota exactly."""
    from tfrecords_builder.splits import assign

    groups = {f"pair{i}": (0, 2) for i in range(40)}
    groups.update({f"one{i}": (0, 1) for i in range(120)})
    out = assign(groups, (0.7, 0.15, 0.15), seed=0)
    pairs = {
        s: sum(1 for g, v in out.items() if g.startswith("pair") and v == s)
        for s in ("train", "val", "test")
    }
    assert pairs["train"] >= 20 and pairs["val"] >= 4 and pairs["test"] >= 4, pairs
    images = {
        s: sum(groups[g][1] for g, v in out.items() if v == s) for s in ("train", "val", "test")
    }
    assert images == {"train": 140, "val": 30, "test": 30}


def test_split_quotas_exact_for_singletons():
    from tfrecords_builder.splits import assign

    groups = {f"g{i}": (int(i < 37), 1) for i in range(100)}
    out = assign(groups, (0.7, 0.15, 0.15), seed=3)
    for label, total in ((1, 37), (0, 63)):
        for split, ratio in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            n = sum(1 for g, s in out.items() if s == split and groups[g][0] == label)
            assert abs(n - ratio * total) <= 1
    assert out == assign(groups, (0.7, 0.15, 0.15), seed=3)


def test_perceptual_hash_equals_imagehash_phash():
    """validation hashes all thumbnails in one matrix product; imagehash is the reference."""
    imagehash = pytest.importorskip("imagehash")
    import tensorflow as tf

    from tfrecords_builder import validation

    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:300, 0:240]
    images = [
        rng.integers(0, 256, (300, 240, 1), dtype=np.uint8),  # noise
        ((np.sin(xx / 17.0) + np.cos(yy / 29.0)) * 60 + 128).astype(np.uint8)[..., None],
        np.dstack([(xx % 64 * 4), (yy % 32 * 8), (xx + yy) % 256]).astype(np.uint8),  # RGB
        np.pad(np.full((100, 80, 1), 220, np.uint8), ((50, 150), (90, 70), (0, 0))),  # a box
    ]
    thumbs = validation.thumbnails([validation.hash_sample(tf.constant(im)) for im in images])
    ours = validation.perceptual_hashes(thumbs)
    reference = [int(str(imagehash.phash(Image.fromarray(t))), 16) for t in thumbs]
    assert ours == reference
    assert len(set(ours)) == len(images)  # distinct images, distinct hashes
    assert validation.perceptual_hash(tf.constant(images[1])) == ours[1]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels and that holds none."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _jpeg_header_only(width: int, height: int) -> bytes:
    """A JPEG whose SOF0 segment (after an APP0 segment) claims ``width`` x ``height``."""
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    components = b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + components
    return b"\xff\xd8" + app0 + sof0 + b"\xff\xd9"


@pytest.mark.parametrize(
    ("header", "size"),
    [
        (_png_header_only, (20_000, 10_000)),
        (_png_header_only, (9_000, 8_000)),
        (_jpeg_header_only, (65_000, 60_000)),
        (_jpeg_header_only, (9_000, 8_000)),
    ],
)
def test_decompression_bombs_are_refused_from_the_header(tmp_path, header, size):
    """--max-pixels stops a file whose header claims too many pixels before any decoding."""
    from tfrecords_builder import validation

    path = tmp_path / "bomb.img"
    path.write_bytes(header(*size))
    checked = validation.check_all([path], max_pixels=60_000_000, workers=2, progress=False)[0]
    assert checked.reason == (
        f"too large: {size[0]}x{size[1]} = {size[0] * size[1]} pixels exceeds --max-pixels "
        "60000000 (decompression-bomb guard)"
    )
    assert checked.phash is None and checked.height == 0


def _encoded_variants() -> list[tuple[str, bytes]]:
    """JPEGs and PNGs as encoders lay them out: EXIF and ICC segments, progressive and
    restart-marker JPEGs, every PNG colour type."""
    import io

    rng = np.random.default_rng(2)
    out = []
    for mode, size in (("L", (37, 23)), ("RGB", (64, 301)), ("RGBA", (5, 7)), ("LA", (300, 2))):
        image = Image.fromarray(rng.integers(0, 256, (*size[::-1], len(mode)), np.uint8).squeeze())
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append((f"png {mode} {size}", buf.getvalue()))
        if mode in ("L", "RGB"):
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: the size is still the stored one
            for kwargs in (
                {},
                {"progressive": True},
                {"exif": exif.tobytes()},
                {"icc_profile": b"\0" * 3000, "restart_marker_blocks": 1},
            ):
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=90, **kwargs)
                out.append((f"jpeg {mode} {size} {sorted(kwargs)}", buf.getvalue()))
    return out


def test_image_size_reads_headers_as_pillow_does():
    from tfrecords_builder import validation

    for name, data in _encoded_variants():
        fmt = validation.sniff(data)
        assert validation.image_size(data, fmt) == Image.open(io.BytesIO(data)).size, name
    jpeg = _encoded_variants()[1][1]
    assert validation.image_size(jpeg[:2] + b"junk" + jpeg[2:], "jpeg") is None  # no marker
    assert validation.image_size(jpeg[:40], "jpeg") is None  # cut before the SOF segment
    assert validation.image_size(b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "png") is None


def test_hash_sample_keeps_gray_or_colour_channels_only(tmp_path):
    """Alpha does not change a hash; a gray image stored as RGB hashes like the gray one."""
    import tensorflow as tf

    from tfrecords_builder import validation

    rng = np.random.default_rng(4)
    gray = rng.integers(0, 256, (90, 70, 1), np.uint8)
    rgb = rng.integers(0, 256, (90, 70, 3), np.uint8)
    alpha = rng.integers(0, 256, (90, 70, 1), np.uint8)
    hash_of = validation.perceptual_hash
    assert hash_of(tf.constant(np.dstack([gray, alpha]))) == hash_of(tf.constant(gray))
    assert hash_of(tf.constant(np.dstack([rgb, alpha]))) == hash_of(tf.constant(rgb))
    assert hash_of(tf.constant(np.dstack([gray] * 3))) == hash_of(tf.constant(gray))
    assert validation.hash_sample(tf.constant(gray)).shape == (64, 64, 1)
    assert validation.hash_sample(tf.constant(rgb[:3, :5])).shape == (64, 64, 3)  # tiny: repeats


def test_validated_bytes_are_the_written_bytes_with_or_without_holding_them(tmp_path):
    """keep_bytes hands the very bytes hashed to the writer; over the memory budget
    (hold_bytes) each file is read again and checked. Both give identical shards."""
    from tfrecords_builder import validation

    sources.make_fracatlas(tmp_path / "src", n_fractured=6, n_normal=9)
    paths = sorted((tmp_path / "src" / "images").rglob("*.*"))
    kept = validation.check_all(paths, workers=2, progress=False, keep_bytes=True)
    for path, c in zip(paths, kept, strict=True):
        assert c.data == (path.read_bytes() if not c.reason and not c.recovered else None)
    assert all(c.data is None for c in validation.check_all(paths, workers=2, progress=False))
    a = build("fracatlas", tmp_path / "src", tmp_path / "a", BuildOptions(**OPTS))
    b = build("fracatlas", tmp_path / "src", tmp_path / "b", BuildOptions(hold_bytes=0, **OPTS))
    assert a["shards"] == b["shards"] and a["splits"] == b["splits"]
    for names in a["shards"].values():
        for name in names:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_near_duplicate_pairs_match_a_brute_force_hamming_count():
    """Clusters of hashes a few flipped bits apart, against bin(a ^ b).count("1") per pair."""
    from tfrecords_builder.duplicates import near_duplicate_pairs

    rng = np.random.default_rng(5)
    hashes = []
    for centre in rng.integers(0, 2**63, 40, dtype=np.int64).tolist():
        for _ in range(int(rng.integers(1, 5))):
            flips = rng.choice(64, size=int(rng.integers(0, 8)), replace=False)
            hashes.append(centre ^ sum(1 << int(b) for b in flips))
    hashes.append(2**64 - 1)  # the top bit set: unsigned all the way
    hashes.append(2**64 - 2)
    for max_distance in (0, 3, 6, 64):
        expected = [
            (i, j, bin(a ^ b).count("1"))
            for i, a in enumerate(hashes)
            for j, b in enumerate(hashes)
            if i < j and bin(a ^ b).count("1") <= max_distance
        ]
        assert near_duplicate_pairs(hashes, max_distance) == expected
    assert (len(hashes) - 2, len(hashes) - 1, 1) in near_duplicate_pairs(hashes, 1)
    assert len(near_duplicate_pairs(hashes, 64)) == len(hashes) * (len(hashes) - 1) // 2


@pytest.mark.slow
def test_same_source_gives_the_same_shard_bytes_in_another_process(tmp_path):
    """Records are serialised deterministically (protobuf map order varies between
    processes otherwise), so two builds of one source can be compared by checksum."""
    import subprocess
    import sys

    sources.make_fracatlas(tmp_path / "src", n_fractured=6, n_normal=9)
    here = build("fracatlas", tmp_path / "src", tmp_path / "here", BuildOptions(**OPTS))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tfrecords_builder",
            "fracatlas",
            "--source",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "there"),
            "--shards",
            "3",
            "--no-progress",
        ],
        check=True,
        capture_output=True,
    )
    there = json.loads((tmp_path / "there" / "manifest.json").read_text())
    assert here["shards"] == there["shards"]
    names = [name for names in here["shards"].values() for name in names]
    assert names
    for name in names:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "there" / name).read_bytes()
