"""The metadata columns of a CSV, of MURA (region) and of GRAZPEDWRI-DX go where FracAtlas' go:
the manifest records them (``tfrecords_builder.metadata``), ``kerasfrac audit``'s no-anatomy
baseline reads them, ``model.meta_head`` learns them, and evaluation reports subgroups by
MURA's region. Columns that restate the label never are metadata. Sources made by code."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from tests import sources
from tests.test_layouts import GRAZ_COLUMNS, OPTS, make_graz, make_mura, png
from tfrecords_builder import metadata
from tfrecords_builder.archive import SourceError
from tfrecords_builder.build import BuildOptions, build


def make_site_csv(root: Path, n: int = 80, seed: int = 4) -> Path:
    """``n`` noise images, one patient each; ``site`` says the label (A fractured, B normal;
    a scanner that only sees fractures), ``age`` is noise, ``fracture_visible`` and
    ``finding`` restate the label (by name and by value)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        rel = f"img{i:03d}.png"
        png(root / "images" / rel, sources.random_image(rng))
        rows.append(
            [
                rel,
                "fractured" if label else "normal",
                f"P{i}",
                "A" if label else "B",
                f"{rng.uniform(5, 80):.1f}",
                "1" if label else "",
                "fracture" if label else "normal",
            ]
        )
    listing = root / "list.csv"
    with listing.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "label", "patient_id", "site", "age", "fracture_visible", "finding"])
        out.writerows(rows)
    return listing


def csv_opts(root: Path, **kw) -> BuildOptions:
    return BuildOptions(image_root=str(root / "images"), split=(0.5, 0.2, 0.3), **OPTS, **kw)


def test_csv_metadata_column_that_predicts_the_label_gives_the_audit_baseline_its_auroc(
    tmp_path,
):
    from kerasfrac.evaluation import audit

    listing = make_site_csv(tmp_path / "src")
    m = build("csv", listing, tmp_path / "out", csv_opts(tmp_path / "src"))
    block = m["metadata"]
    assert block["storage"] == "metadata.csv"
    kinds = {c["name"]: c["kind"] for c in block["columns"]}
    assert kinds == {"site": "categorical", "age": "numeric"}
    assert block["features"] == ["site=A", "site=B", "age"]
    assert block["targets"] == ["site=A", "site=B"]  # numbers are never meta_head targets
    assert set(m["label_columns"]) == {"fracture_visible", "finding"}  # by name, by value
    card = audit.audit(tmp_path / "out", tmp_path / "audit", n_bootstrap=50)
    base = card["baseline"]["auroc"]
    assert base["metadata"]["features"] == ["metadata.site=A", "metadata.site=B", "metadata.age"]
    assert base["metadata"]["auroc"] > 0.95 and base["all"]["auroc"] > 0.95
    assert base["all_but_metadata"]["auroc"] < 0.85  # noise images: the pixels say nothing
    names = {f["feature"] for f in card["feature_auroc_test"]}
    assert not {n for n in names if "fracture" in n or "finding" in n}
    # evaluate's comparison reads the same baseline
    table = audit.features(tmp_path / "out", "test")
    site = table.x[:, table.names.index("metadata.site=A")]
    np.testing.assert_array_equal(site, table.labels)


def test_csv_meta_columns_choose_the_metadata_and_refuse_label_columns_by_name(tmp_path):
    listing = make_site_csv(tmp_path / "src", n=12)
    m = build(
        "csv", listing, tmp_path / "out", csv_opts(tmp_path / "src", meta_columns=("age:numeric",))
    )
    assert [c["name"] for c in m["metadata"]["columns"]] == ["age"]
    for asked, match in (
        (("fracture_visible",), r"'fracture_visible'.*restates the label.*Leave it out"),
        (("finding",), r"\['finding'\].*restate the label"),
        (("weight",), r"names 'weight'.*its other columns are"),
        (("site:colour",), r"unknown kind 'colour'.*binary"),
        (("site:numeric",), r"column 'site' is numeric but holds \['A', 'B'\]"),
    ):
        out = tmp_path / f"out-{asked[0].split(':')[0]}-{len(asked[0])}"
        with pytest.raises(SourceError, match=match):
            build("csv", listing, out, csv_opts(tmp_path / "src", meta_columns=asked))
        assert not out.exists()  # nothing written
    with pytest.raises(ValueError, match="--meta-columns is for layouts"):
        build("mura", tmp_path, tmp_path / "x", BuildOptions(meta_columns=("a",), **OPTS))


def _rewrite_graz(root: Path, change) -> None:
    path = root / "dataset.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        change(row)
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, GRAZ_COLUMNS)
        out.writeheader()
        out.writerows(rows)


def test_grazpedwri_metadata_columns_reach_the_baseline_and_label_columns_never(tmp_path):
    from kerasfrac.evaluation import audit

    make_graz(tmp_path / "src", np.random.default_rng(9))

    def cast_on_fractures(row):  # a cast says fracture; empty flags mean no
        row["cast"] = "1" if row["fracture_visible"] else ""
        row["laterality"] = "R" if int(row["filestem"][-2:]) % 2 else "L"

    _rewrite_graz(tmp_path / "src", cast_on_fractures)
    m = build("grazpedwri", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    block = m["metadata"]
    kinds = {c["name"]: c["kind"] for c in block["columns"]}
    assert kinds == {
        "projection": "categorical",
        "laterality": "categorical",
        "age": "numeric",
        "gender": "categorical",
        "cast": "binary",
        "metal": "binary",
        "osteopenia": "binary",
        "device_manufacturer": "categorical",
    }
    assert block["targets"] == [
        "projection=ap",
        "laterality=L",
        "laterality=R",
        "cast",
        "metal",
    ] + ["osteopenia"]
    assert not {"fracture_visible", "ao_classification"} & set(kinds)
    tables = [audit.features(tmp_path / "out", s) for s in ("train", "val", "test")]
    labels = np.concatenate([t.labels for t in tables])
    cast = np.concatenate([t.x[:, t.names.index("metadata.cast")] for t in tables])
    np.testing.assert_array_equal(cast, labels)
    metal = np.concatenate([t.x[:, t.names.index("metadata.metal")] for t in tables])
    assert np.all(metal == 0)  # empty means no
    assert not [n for n in tables[0].names if "fracture" in n or "ao_" in n]


def test_grazpedwri_flag_that_is_not_a_flag_is_refused_naming_the_column(tmp_path):
    make_graz(tmp_path / "src", np.random.default_rng(9))
    _rewrite_graz(tmp_path / "src", lambda row: row.update(osteopenia="maybe"))
    with pytest.raises(SourceError, match=r"column 'osteopenia' is binary but holds \['maybe'\]"):
        build("grazpedwri", tmp_path / "src", tmp_path / "out", BuildOptions(**OPTS))
    assert not (tmp_path / "out").exists()


def test_fracatlas_style_and_older_builds_keep_the_record_flags():
    from tfrecords_builder.defaults import META_TARGETS

    assert metadata.targets({}) == META_TARGETS  # a manifest from before the block
    block = metadata.records_block()
    assert metadata.targets({"metadata": block}) == META_TARGETS
    assert "fractured" not in block["features"] and "fracture_count" not in block["features"]
    assert metadata.read("/nonexistent", {"metadata": block}) is None
    assert metadata.targets({"metadata": None}) == ()  # built without metadata columns


@pytest.fixture(scope="module")
def mura_build(tmp_path_factory):
    top = tmp_path_factory.mktemp("mura")
    expected = make_mura(top / "src", np.random.default_rng(12))
    build("mura", top / "src", top / "out", BuildOptions(**OPTS))
    return top / "out", expected


def test_mura_region_is_a_meta_head_target_in_the_training_stream(mura_build):
    from kerasfrac import config, data

    out, expected = mura_build
    m = metadata.read(out, __import__("json").loads((out / "manifest.json").read_text()))
    assert m.target_names == ["region=elbow", "region=wrist"]
    cfg = config.DataConfig(dir=str(out), image_size=32, flips="none", oversample=False)
    ds, _ = data.make_dataset(None, "train", cfg, 4, seed=0, with_meta=True)
    got = {tuple(row) for b in ds for row in b["meta"].numpy()}
    assert got == {(1.0, 0.0), (0.0, 1.0)}  # one-hot regions, never unknown


@pytest.mark.slow
def test_meta_head_trains_on_mura_and_evaluation_has_region_subgroups(tmp_path, mura_build):
    from kerasfrac import models
    from kerasfrac.evaluation import evaluate
    from kerasfrac.training import train
    from tests.conftest import fast_config

    out, _ = mura_build
    cfg = fast_config(out, tmp_path / "run", epochs=1, steps_per_epoch=3, meta_loss_weight=1.0)
    cfg.dataset = "mura"
    cfg.model.name = "resnet_small"
    cfg.model.meta_head = True
    train.train(cfg, verbose=0)
    full = models.load_model(sorted((tmp_path / "run").glob("checkpoints/gen-*/model.keras"))[-1])
    assert models.has_meta_head(full)
    assert full.outputs[-1].shape[-1] == 2  # region=elbow, region=wrist: the build's targets
    result = evaluate.evaluate_run(tmp_path / "run")
    assert {"region=elbow", "region=wrist"} <= set(result["subgroups"])
    base = result["no_anatomy_baseline"]
    assert {"region=elbow", "region=wrist"} <= set(base["subgroups"])
    assert set(base["within_region"]["regions"]) == {"elbow", "wrist"}


def test_meta_head_on_a_csv_build_without_learnable_columns_is_refused_naming_the_key(tmp_path):
    from kerasfrac import config, data
    from tfrecords_builder.reader import BuildOutputError

    listing = make_site_csv(tmp_path / "src", n=12)
    opts = csv_opts(tmp_path / "src", meta_columns=("age",))
    m = build("csv", listing, tmp_path / "out", opts)
    assert m["metadata"]["targets"] == []  # age is numeric: never a target
    cfg = config.DataConfig(dir=str(tmp_path / "out"), image_size=32, oversample=False)
    with pytest.raises(BuildOutputError, match=r"model.meta_head.*set model.meta_head=false"):
        data.make_dataset(None, "train", cfg, 2, with_meta=True)
