"""A careless or hostile user's probes (issue 17): nothing is deleted that kerasfrac did not
write, concurrent builds are refused, inputs are bounded, bad files are named."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from kerasfrac import config, data, demo, predict
from kerasfrac.cli import main
from kerasfrac.training import train
from tests import sources
from tests.conftest import make_run, make_tfrecord_dir
from tfrecords_builder import archive, load_manifest, writer
from tfrecords_builder.archive import SourceError
from tfrecords_builder.build import BuildOptions, build

OPTS = dict(progress=False, shards=2)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def tibia(tmp_path) -> Path:
    src = tmp_path / "src"
    sources.make_tibia(src, "mendeley", n_fractured=4, n_normal=4, copies=0)
    (src / "NOTES.txt").write_text("my notes\n")
    return src


# --------------------------------------------------------------------------- build --overwrite


def test_build_overwrite_never_replaces_the_source_or_what_holds_it(tibia, tmp_path):
    before = snapshot(tibia)
    for out in (tibia, tmp_path):
        with pytest.raises(writer.OutputExistsError, match="source"):
            build("tibia-fibula", tibia, out, BuildOptions(overwrite=True, **OPTS))
    assert snapshot(tibia) == before


def test_build_overwrite_replaces_only_a_build(tibia, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.txt").write_text("keep me\n")
    with pytest.raises(writer.OutputExistsError, match="not a kerasfrac build.*Nothing"):
        build("tibia-fibula", tibia, notes, BuildOptions(overwrite=True, **OPTS))
    assert snapshot(notes) == {"NOTES.txt": b"keep me\n"}
    out = tmp_path / "out"
    build("tibia-fibula", tibia, out, BuildOptions(**OPTS))
    build("tibia-fibula", tibia, out, BuildOptions(overwrite=True, seed=7, **OPTS))
    assert load_manifest(out)["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "out", "src"]  # no lock left


# --------------------------------------------------------------------------- lock, stale folders


def test_second_concurrent_build_fails_at_once(tibia, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
            "f.write('pid of the test'); f.flush(); fcntl.flock(f, fcntl.LOCK_EX); print('ok', "
            "flush=True); time.sleep(60)",
            str(tmp_path / ".out.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        started = time.perf_counter()
        with pytest.raises(writer.BuildLockedError, match="another build is writing.*out"):
            build("tibia-fibula", tibia, out, BuildOptions(**OPTS))
        assert time.perf_counter() - started < 5
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    build("tibia-fibula", tibia, out, BuildOptions(**OPTS))  # the lock died with its holder
    assert (out / "manifest.json").is_file()


def test_killed_builds_leftovers_cleaned_and_a_swapped_out_build_restored(tibia, tmp_path, capsys):
    out = tmp_path / "out"
    build("tibia-fibula", tibia, out, BuildOptions(**OPTS))
    manifest = (out / "manifest.json").read_text()
    # killed between the two renames of an overwrite: the old build sits in .out.old-*/out
    (tmp_path / ".out.old-x1").mkdir()
    os.rename(out, tmp_path / ".out.old-x1" / "out")
    for stale in (".out.incomplete-a", ".out.extract-b"):
        (tmp_path / stale / "junk").mkdir(parents=True)
    with pytest.raises(writer.OutputExistsError, match="already exists"):
        build("tibia-fibula", tibia, out, BuildOptions(**OPTS))
    assert (out / "manifest.json").read_text() == manifest
    err = capsys.readouterr().err
    assert "restored the previous build" in err and ".out.incomplete-a" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


# --------------------------------------------------------------------------- archives


def _fracatlas_zip(tmp_path: Path, extra: dict[str, bytes]) -> Path:
    src = tmp_path / "fa"
    sources.make_fracatlas(src)
    path = tmp_path / "fa.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(src.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(tmp_path).as_posix())
        for name, payload in extra.items():
            z.writestr(name, payload)
    return path


def test_zip_bomb_refused_before_extraction(tmp_path):
    bomb = _fracatlas_zip(tmp_path, {"fa/images/Fractured/bomb.jpg": bytes(64 << 20)})
    assert bomb.stat().st_size < 1 << 20
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=r"bomb\.jpg.*expands from .* to 67,108,864 bytes"):
        build("fracatlas", bomb, out, BuildOptions(**OPTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fa", "fa.zip"]  # nothing extracted


def test_zip_larger_than_the_limit_refused(tmp_path, monkeypatch):
    path = _fracatlas_zip(tmp_path, {})
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", 1000)
    with pytest.raises(SourceError, match="bytes uncompressed, more than the 1,000 bytes"):
        build("fracatlas", path, tmp_path / "out", BuildOptions(**OPTS))


# --------------------------------------------------------------------------- file names


def test_non_utf8_file_name_quarantined_with_its_bytes(tibia, tmp_path):
    first = sorted((tibia / "fracture").iterdir())[0]
    os.rename(first, os.fsencode(tibia / "fracture") + b"/bad\xff\xfe.png")
    m = build("tibia-fibula", tibia, tmp_path / "out", BuildOptions(**OPTS))
    (entry,) = [q for q in m["quarantined"] if "UTF-8" in q["reason"]]
    assert (
        entry["file"] == "fracture/bad\\xff\\xfe.png"
        and "b'fracture/bad\\xff\\xfe.png'" in (entry["reason"])
    )
    assert m["accounting"]["total"]["balanced"] and m["written"]["total"] == 7


# --------------------------------------------------------------------------- demo


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "NOTES.txt").write_text("precious\n")
    assert main(["demo", "--out", str(out)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert snapshot(out) == {"NOTES.txt": b"precious\n"}


def test_demo_reruns_only_over_its_own_outputs(tmp_path):
    out = tmp_path / "demo"
    (out / "tfrecords").mkdir(parents=True)
    (out / demo.MARKER).write_text("")
    real = {"source": "fracatlas", "source_path": "/data/FracAtlas"}
    (out / "tfrecords" / "manifest.json").write_text(json.dumps(real))
    with pytest.raises(demo.DemoOutError, match="not the demo's synthetic build"):
        demo.check_out(out)
    own = {"source": "synthetic", "source_path": str((out / "synthetic-raw").resolve())}
    (out / "tfrecords" / "manifest.json").write_text(json.dumps(own))
    (out / "run").mkdir()
    (out / "run" / "config.yaml").write_text("data:\n  dir: /elsewhere\n")
    with pytest.raises(demo.DemoOutError, match="not a run of the demo"):
        demo.check_out(out)
    (out / "run" / "config.yaml").write_text(f"data:\n  dir: {out / 'tfrecords'}\n")
    demo.check_out(out)  # an earlier demo's folder: a rerun may replace its parts


# --------------------------------------------------------------------------- predict


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, separable_tfrecord_dir):
    return make_run(tmp_path_factory.mktemp("safety") / "run", separable_tfrecord_dir)


def test_predict_applies_the_builders_pixel_guard(run_dir, tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    results, skipped, _, _ = predict.predict_files(
        run_dir / "model.keras", [tmp_path / "bomb.png"], threshold=0.5
    )
    assert results == []
    assert skipped[0][1].startswith("too large: 20000x20000 = 400,000,000 pixels")


def test_predict_threshold_nan_and_damaged_run_files_named(run_dir, tmp_path):
    image = tmp_path / "z.png"
    image.write_bytes(_png_header_only(8, 8))
    with pytest.raises(ValueError, match=r"--threshold must be a probability in \[0, 1\]; got nan"):
        predict.predict_files(run_dir / "model.keras", [image], threshold=float("nan"))
    (run_dir / "metrics.json").write_text("{truncated")
    try:
        with pytest.raises(ValueError, match="cannot read the run's metrics .*metrics.json"):
            predict.predict_files(run_dir / "model.keras", [image])
    finally:
        (run_dir / "metrics.json").unlink()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    (broken / "model.keras").write_bytes((run_dir / "model.keras").read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.keras' is damaged"):
        predict.predict_files(broken / "model.keras", [image])


# --------------------------------------------------------------------------- training input


def test_non_finite_learning_rate_refused():
    for value in ("nan", "inf"):
        with pytest.raises(config.ConfigError, match="learning_rate.*positive number"):
            config.load_config(None, [f"train.learning_rate={value}"])
    with pytest.raises(config.ConfigError, match="weight_decay"):
        config.load_config(None, ["train.weight_decay=nan"])


def test_build_without_val_split_refused_before_training(tmp_path):
    build_dir = make_tfrecord_dir(tmp_path / "noval", {"train": 8, "val": 0, "test": 4}, size=16)
    cfg = config.from_dict(
        {
            "dataset": "synthetic",
            "run_dir": str(tmp_path / "run"),
            "data": {"dir": str(build_dir), "image_size": 16},
            "train": {"batch_size": 4},
        }
    )
    with pytest.raises(data.BuildOutputError, match="no images in its val split"):
        train.train(cfg, verbose=0)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- FracAtlas metadata

COCO = Path("Annotations") / "COCO JSON" / "COCO_fracture_masks.json"


def test_bad_csv_and_coco_files_named_and_empty_boxes_skipped(tmp_path):
    src = tmp_path / "fa"
    sources.make_fracatlas(src, n_fractured=4, n_normal=4, defects=False)
    coco = json.loads((src / COCO).read_text())
    first, second = coco["annotations"][:2]
    first["bbox"][3] = 0  # a box of height 0
    del second["bbox"]
    (src / COCO).write_text(json.dumps(coco))
    m = build("fracatlas", src, tmp_path / "out", BuildOptions(**OPTS))
    reasons = [s["reason"] for s in m["notes"]["boxes_skipped"]]
    assert len(reasons) == 2 and "empty box" in reasons[0] and "no usable bbox" in reasons[1]
    (src / COCO).write_text('{"images": [')
    with pytest.raises(SourceError, match="COCO_fracture_masks.json.*not a COCO annotation"):
        build("fracatlas", src, tmp_path / "out2", BuildOptions(**OPTS))
    (src / COCO).unlink()
    csv_file = src / "dataset.csv"
    csv_file.write_bytes(csv_file.read_bytes().replace(b"image_id", b"image_id\xff", 1))
    with pytest.raises(SourceError, match="dataset.csv' is not UTF-8"):
        build("fracatlas", src, tmp_path / "out3", BuildOptions(**OPTS))


def test_symbolic_links_never_vanish_and_never_lead_out_of_the_source(tibia, tmp_path):
    outside = tmp_path / "outside.png"
    first = sorted((tibia / "normal").iterdir())[0]
    outside.write_bytes(first.read_bytes())
    folder = tibia / "normal"
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "outside.png").symlink_to(outside)
    (folder / "inside.png").symlink_to(first)
    (tmp_path / "more").mkdir()
    (folder / "more").symlink_to(tmp_path / "more", target_is_directory=True)
    m = build("tibia-fibula", tibia, tmp_path / "out", BuildOptions(**OPTS))
    reasons = {q["file"]: q["reason"] for q in m["quarantined"]}
    assert reasons["normal/dangling.png"].startswith("dangling symbolic link")
    assert "outside the source" in reasons["normal/outside.png"]
    assert "symbolic link to a folder" in reasons["normal/more"]
    assert "normal/inside.png" not in reasons  # a link within the source is an image
    assert m["found"]["normal"] == 4 + 4 and m["accounting"]["total"]["balanced"]


def test_report_names_a_damaged_metrics_json(run_dir, tmp_path):
    from kerasfrac.evaluation import report

    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "config.yaml").write_bytes((run_dir / "config.yaml").read_bytes())
    (copy / "metrics.json").write_text('{"auroc": 0.7')
    with pytest.raises(ValueError, match="cannot read .*metrics.json"):
        report.run_row(copy)


# --------------------------------------------------------------- bounded configs (issue 40)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path):
    """A "billion laughs" config (aliases nested ten deep, 10^10 nodes once expanded) as the
    value of a known key is refused at once, in a file and in --set; anchors alone are fine."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nrun_dir: *a9\n")
    start = time.perf_counter()
    with pytest.raises(config.ConfigError, match=r"aliases \(\*name\) are not accepted"):
        config.load_config(bomb)
    assert time.perf_counter() - start < 5
    with pytest.raises(config.ConfigError, match="aliases"):
        config.load_config(None, ["train.epochs=*x"])
    anchored = tmp_path / "anchor.yaml"
    anchored.write_text("train:\n  epochs: &n 3\n")
    assert config.load_config(anchored).train.epochs == 3


def test_config_errors_show_a_value_cut_short(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  epochs: [" + ", ".join(["1"] * 100_000) + "]\n")
    with pytest.raises(config.ConfigError, match="expects int") as err:
        config.load_config(path)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize(
    "override,match",
    [
        ("data.image_size=100000", r"'data.image_size' must be at most 4096"),
        ("train.epochs=1000000000", r"'train.epochs' must be at most 10000"),
        ("train.batch_size=100000", r"'train.batch_size' must be at most 4096"),
    ],
)
def test_sizes_have_upper_bounds_with_the_reason(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load_config(None, [override])
    key, value = override.split("=")
    upper = str(int(match.split("at most ")[1]))
    assert config.load_config(None, [f"{key}={upper}"]) is not None  # the bound itself is fine


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.1, "0.4"])
def test_a_damaged_threshold_in_metrics_json_is_refused(run_dir, tmp_path, capsys, bad):
    """predict used to call every image normal with a NaN threshold read from metrics.json;
    now it refuses, naming the file and the fix, and --threshold still works."""
    import shutil

    from PIL import Image

    from kerasfrac import runs

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "metrics.json").write_text(json.dumps({"youden": {"threshold": bad}}))
    with pytest.raises(ValueError, match=r"Youden-J threshold in .*metrics.json.*not a probab"):
        runs.youden_threshold(run)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (32, 32), 90).save(images / "x.png")
    model = str(run / "model.keras")
    assert main(["predict", "--model", model, str(images)]) == 2
    assert "rerun `kerasfrac evaluate" in capsys.readouterr().err
    assert main(["predict", "--model", model, "--threshold", "0.5", str(images)]) == 0
