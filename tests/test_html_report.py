"""report.html: the run page (written by evaluate, completed by explain), the comparison page
of `kerasfrac report --html`, their content, and the page in a real browser (headless
Chromium, network off). Tests on an evaluated run are ``slow`` (its evaluation takes seconds);
the pure ones (gallery choice, overlay, escaping, links) are not."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from markupsafe import escape
from PIL import Image

from kerasfrac import runs
from kerasfrac.cli import main
from kerasfrac.evaluation import evaluate
from kerasfrac.evaluation import html as report_html
from tests.conftest import make_run, make_tfrecord_dir

BOX = (0.2, 0.3, 0.7, 0.6)  # ymin, xmin, ymax, xmax of every fractured image's box


class Page(HTMLParser):
    """What the tests read off a page: every <img> src, the gallery figures per group
    (id, probability, label, img src) in page order, and the visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs: list[str] = []
        self.groups: dict[str, list[dict]] = {}
        self.tags: set[str] = set()
        self.links: list[str] = []
        self._group = None
        self._depth = 0
        self._text: list[str] = []
        self.feed(text)
        self.text = " ".join(" ".join(self._text).split())

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "div" and "data-group" in a:
            self._group, self._depth = a["data-group"], 0
            self.groups[self._group] = []
        elif tag == "div" and self._group:
            self._depth += 1
        if tag == "figure" and self._group and "data-id" in a:
            self.groups[self._group].append(
                {"id": a["data-id"], "p": float(a["data-probability"]), "label": a["data-label"]}
            )
        if tag == "img":
            self.imgs.append(a["src"])
            if self._group:
                self.groups[self._group][-1]["src"] = a["src"]

    def handle_endtag(self, tag):
        if tag == "div" and self._group:
            if self._depth == 0:
                self._group = None
            else:
                self._depth -= 1

    def handle_data(self, data):
        self._text.append(data)


def decode_data_uri(src: str) -> Image.Image:
    head, _, data = src.partition(",")
    assert head in ("data:image/png;base64", "data:image/jpeg;base64"), head[:40]
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def expected_gallery(run_dir: Path, n: int = 6):
    """The galleries computed here from predictions.csv and the Youden-J threshold in
    metrics.json, independently of the code under test."""
    ids, labels, probs = runs.read_predictions(run_dir / "predictions.csv")
    t = json.loads((run_dir / "metrics.json").read_text())["youden"]["threshold"]
    rows = list(zip(ids, labels, probs))
    fp = sorted((r for r in rows if r[1] == 0 and r[2] >= t), key=lambda r: (-r[2], r[0]))
    fn = sorted((r for r in rows if r[1] == 1 and r[2] < t), key=lambda r: (r[2], r[0]))
    tp = [r for r in rows if r[1] == 1 and r[2] >= t]
    return t, [r[0] for r in fp[:n]], [r[0] for r in fn[:n]], tp, dict(zip(ids, probs))


@pytest.fixture(scope="module")
def html_run(tmp_path_factory, separable_tfrecord_dir):
    """An evaluated run on the separable build, without boxes or metadata; its predictions
    are planted (drawn to give false positives and negatives aplenty), its maps come from an
    untrained seeded paper CNN. Tests read it and never change it."""
    run = make_run(tmp_path_factory.mktemp("html") / "run", separable_tfrecord_dir)
    # Predictions evaluate reads back. Val puts the Youden-J threshold at 0.614 (J ties at
    # 0.625; the higher threshold wins), where test has 3 false positives, 5 false negatives
    # and 3 true positives.
    planted = {
        "val": (np.linspace(0.4, 0.9, 8), np.linspace(0.1, 0.6, 8)),
        "test": (
            [0.15, 0.3, 0.4, 0.52, 0.6, 0.75, 0.88, 0.95],
            [0.05, 0.2, 0.3, 0.45, 0.55, 0.62, 0.7, 0.85],
        ),
    }
    for split, (fractured, normal) in planted.items():
        ids = [f"{split}_{c}_{i:04d}.png" for c in ("fractured", "normal") for i in range(8)]
        probs = np.round(np.concatenate([fractured, normal]), 6)
        runs.write_predictions(runs.predictions_path(run, split), ids, [1] * 8 + [0] * 8, probs)
    assert evaluate.evaluate_run(run, n_bootstrap=200)["predictions"] == "read"
    return run


@pytest.fixture(scope="module")
def boxed_run(tmp_path_factory):
    """A run on a build whose fractured images carry a fracture box, evaluated without the
    no-anatomy baseline, without plots and without an audit of the build."""
    root = tmp_path_factory.mktemp("boxed")
    build = make_tfrecord_dir(
        root / "build",
        {"train": 6, "val": 8, "test": 8},
        boxes=lambda rng, image, label: [BOX] if label == 1 else [],
    )
    run = make_run(root / "run", build, seed=1)
    evaluate.evaluate_run(run, n_bootstrap=0, baseline=False, plots=False)
    return run


def test_select_gallery_by_hand():
    ids = ["a", "b", "c", "d", "e", "f", "g", "h"]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    probs = [0.9, 0.2, 0.7, 0.7, 0.1, 0.4, 0.8, 0.95]
    picks, counts = report_html.select_gallery(ids, labels, probs, 0.5, n=2, seed=0)
    named = {k: [ids[i] for i in v] for k, v in picks.items()}
    # normals at or above 0.5: a 0.9, c 0.7, d 0.7 (tie: by id) -> the two most confident
    assert named["false_positives"] == ["a", "c"]
    # fractured below 0.5: e 0.1, f 0.4 -> lowest first
    assert named["false_negatives"] == ["e", "f"]
    assert sorted(named["true_positives"]) == ["g", "h"] and named["true_positives"][0] == "h"
    assert counts == {"false_positives": 3, "false_negatives": 2, "true_positives": 2}
    one, _ = report_html.select_gallery(ids, labels, probs, 0.5, n=1, seed=3)
    again, _ = report_html.select_gallery(ids, labels, probs, 0.5, n=1, seed=3)
    assert one == again and len(one["true_positives"]) == 1  # seeded sample
    with pytest.raises(ValueError, match="gallery size must be 0 or more"):
        report_html.select_gallery(ids, labels, probs, 0.5, n=-1)
    with pytest.raises(ValueError, match="differ in length"):
        report_html.select_gallery(ids, labels[:-1], probs, 0.5)


def test_links_between_pages_stay_paths(tmp_path):
    base = tmp_path / "pages"
    odd = tmp_path / "javascript:alert(1) #2?x" / "report.html"
    assert (
        report_html.relative_href(odd, base)
        == "../javascript%3Aalert%281%29%20%232%3Fx/report.html"
    )
    assert report_html.relative_href(base / "a b" / "report.html", base) == "./a%20b/report.html"


def test_templates_ship_as_package_data():
    """setup.cfg's package_data glob covers every template, so a normal (non-editable)
    install carries them."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    globs = cfg["options.package_data"]["kerasfrac.evaluation"].split(",")
    folder = Path(report_html.__file__).parent
    templates = sorted(
        p.relative_to(folder) for p in (folder / "templates").rglob("*") if p.is_file()
    )
    assert templates, "no templates found"
    for t in templates:
        assert any(t.match(g.strip()) for g in globs), f"{t} is not in setup.cfg's package_data"


def test_overlay_draws_boxes_and_the_heat_map():
    image = np.full((32, 32, 1), 0.5, np.float32)
    cam = np.zeros((32, 32), np.float32)
    cam[8, 24] = 1.0  # the peak, top right
    plain = Image.open(io.BytesIO(report_html.overlay_jpeg(image, np.zeros_like(cam))))
    boxed = Image.open(io.BytesIO(report_html.overlay_jpeg(image, cam, np.array([BOX]))))
    assert plain.format == boxed.format == "JPEG" and boxed.size == (256, 256)
    px = np.asarray(boxed.convert("RGB"), int)
    left_edge = px[int(0.45 * 256), int(0.3 * 256)]  # on the box's left side
    assert left_edge[1] > 200 and left_edge[0] < 90 and left_edge[2] < 90  # green
    gray = np.asarray(plain.convert("RGB"), int)
    assert np.abs(gray - 128).max() < 10  # no map, no box: the image alone


@pytest.mark.slow
def test_run_page_shows_the_right_gallery_images(html_run):
    page_text = (html_run / "report.html").read_text()
    page = Page(page_text)
    t, fp, fn, tp, prob = expected_gallery(html_run)
    assert (len(fp), len(fn), len(tp)) == (3, 5, 3) and t == pytest.approx(0.614286, abs=1e-6)
    got = {k: [f["id"] for f in v] for k, v in page.groups.items()}
    assert got["false_positives"] == fp
    assert got["false_negatives"] == fn
    tp_ids = {r[0] for r in tp}
    assert len(got["true_positives"]) == min(6, len(tp)) and set(got["true_positives"]) <= tp_ids
    for group in page.groups.values():
        for fig in group:
            assert fig["p"] == pytest.approx(prob[fig["id"]], abs=1e-6)
            thumb = decode_data_uri(fig["src"])
            assert thumb.format == "JPEG" and max(thumb.size) == 256
    assert f"threshold {t:.4f}" in page.text and "Youden-J threshold chosen on val" in page.text
    assert "This build has no fracture boxes" in page.text


@pytest.mark.slow
def test_gallery_thumbnails_are_those_images_under_their_maps(html_run):
    """Each thumbnail is its image as the evaluation pipeline gives it to the model, under
    that image's Grad-CAM map: remade here from the pipeline and compared, and unlike the
    thumbnail of any other image."""
    from kerasfrac import data
    from kerasfrac.explain import gradcam

    cfg, model, _ = runs.load_model(html_run)
    images = {}
    for batch in data.make_eval_dataset(cfg.data.dir, "test", cfg.data, 8, with_ids=True):
        images.update(zip((i.decode() for i in batch["id"].numpy()), batch["image"].numpy()))
    cam = gradcam.GradCam(model)
    page = Page((html_run / "report.html").read_text())
    shown = {f["id"]: f["src"] for group in page.groups.values() for f in group}
    assert len(shown) == 11

    def pixels(jpeg: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), float)

    remade = {
        i: pixels(report_html.overlay_jpeg(images[i], cam(images[i][None], 1.0)[0])) for i in shown
    }
    for image_id, src in shown.items():
        got = np.asarray(decode_data_uri(src).convert("RGB"), float)
        diffs = {other: np.abs(got - want).mean() for other, want in remade.items()}
        assert diffs[image_id] < 0.5, (image_id, diffs[image_id])  # 0.0 here
        assert min(d for other, d in diffs.items() if other != image_id) > 5  # 12-35 here


@pytest.mark.slow
def test_run_page_content(html_run):
    page_text = (html_run / "report.html").read_text()
    page = Page(page_text)
    m = json.loads((html_run / "metrics.json").read_text())
    lo, hi = m["ci95"]["auroc"]
    assert f"{m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in page.text
    glance = re.search(r'<p id="glance"[^>]*>(.*?)</p>', page_text, re.S).group(1)
    assert f"Test AUROC {m['auroc']:.3f} [{lo:.3f}, {hi:.3f}] on 16 images" in glance
    assert "does NOT clearly beat" in glance  # the baseline's verdict on the first screen
    assert f"{100 * m['majority_baseline_accuracy']:.1f}%" in page.text
    base = m["no_anatomy_baseline"]
    assert f"{base['baseline_auroc']['auroc']:.3f}" in page.text
    assert base["sentence"] in page.text  # the verdict, unescaped by the parser
    assert "architecture paper_cnn image size 32 px, grayscale, stretch" in page.text
    assert "test 8 8 16" in page.text  # the split table: fractured, normal, images
    assert "size=small" in page.text  # the baseline's subgroups
    for png in ("ROC with its 95% bootstrap band", "Reliability", "Training curves"):
        assert png in page.text
    # five figures + three galleries' JPEGs, every one embedded and decodable
    assert len(page.imgs) == 5 + sum(len(v) for v in page.groups.values())
    for src in page.imgs:
        decode_data_uri(src)
    # self-contained: nothing fetched, no script
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page_text)
    assert "url(" not in page_text and "@import" not in page_text
    assert len(page_text) < 3_000_000
    assert "No explanations yet" in page.text


@pytest.mark.slow
def test_page_without_boxes_baseline_plots_or_audit_still_renders(boxed_run):
    page = Page((boxed_run / "report.html").read_text())
    assert "No no-anatomy baseline" in page.text and "kerasfrac audit" in page.text
    assert "No evaluation figures in plots/" in page.text
    assert "Green: the build's fracture boxes" in page.text
    assert "has no fracture boxes" not in page.text
    gallery = json.loads((boxed_run / "gallery" / "gallery.json").read_text())
    fractured = [f for v in page.groups.values() for f in v if f["label"] == "1"]
    assert fractured
    by_id = {e["id"]: e for v in gallery["groups"].values() for e in v}
    for fig in fractured:
        assert by_id[fig["id"]]["n_boxes"] == 1
        px = np.asarray(decode_data_uri(fig["src"]).convert("RGB"), int)
        edge = px[int(0.45 * 256), int(0.3 * 256)]  # on the box's left side
        assert edge[1] > 180 and edge[1] - max(edge[0], edge[2]) > 60, edge


@pytest.mark.slow
def test_damaged_gallery_and_metrics_are_named_on_the_page(boxed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(boxed_run, run)
    gallery = run / "gallery" / "gallery.json"
    record = json.loads(gallery.read_text())
    del record["threshold"]
    gallery.write_text(json.dumps(record))
    page = Page(report_html.render_run(run))
    assert f"No galleries: {gallery} cannot be read (KeyError: 'threshold')" in page.text
    assert f"rerun `kerasfrac evaluate --run-dir {run}`" in page.text
    assert page.groups == {}
    gallery.write_text("[1, 2")
    assert "cannot be read (ValueError: not a JSON object)" in report_html.render_run(run)
    (run / "metrics.json").write_text("{")  # damaged too: named, the rest still shown
    page = Page(report_html.render_run(run))
    assert f"cannot read the run's metrics '{run / 'metrics.json'}'" in page.text
    assert "rerun `kerasfrac evaluate" in page.text and "Data and split" in page.text


@pytest.mark.slow
def test_audit_baseline_is_shown_when_the_evaluation_has_none(boxed_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(boxed_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    audit_dir = Path(cfg["data"]["dir"]) / "audit"
    audit_dir.mkdir()
    try:
        (audit_dir / "audit.json").write_text(
            json.dumps({"baseline": {"auroc": {"all": {"auroc": 0.6123, "ci95": [0.5, 0.7]}}}})
        )
        page = Page(report_html.render_run(run))
    finally:
        shutil.rmtree(audit_dir)
    assert "0.612 [0.500, 0.700]" in page.text and "kerasfrac audit" in page.text
    assert "No no-anatomy baseline" not in page.text


def test_metrics_as_train_writes_them_render(tmp_path):
    """train's own metrics.json (no val threshold, calibration, baseline or plots) renders."""
    from kerasfrac.evaluation import metrics

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset": "synthetic", "data": {}}))
    m = metrics.split_metrics([0, 0, 0, 1, 1, 1], [0.1, 0.4, 0.6, 0.4, 0.8, 0.9], n_bootstrap=0)
    (run / "metrics.json").write_text(json.dumps({"split": "test", "epochs": 2, **m}))
    page = Page(report_html.render_run(run))
    assert f"this model {m['auroc']:.3f} 66.7%" in page.text  # AUROC 7.5/9, no CI
    assert "model after 2 epochs" in page.text and "Youden" not in page.text
    assert "No evaluation figures" in page.text and "No galleries yet" in page.text


def test_user_text_is_escaped(tmp_path):
    """Run names, paths and ids from the user reach the page as text, never as markup; a run
    that was never evaluated renders with notes saying what to run."""
    evil = '<img src=x onerror=alert(1)>&"q"'
    run = tmp_path / f"run{evil}"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"dataset": "synthetic", "data": {"dir": "<script>alert(2)</script>"}})
    )
    text = report_html.render_run(run)
    assert "<img src=x" not in text and "<script>" not in text
    assert "&lt;img src=x onerror=alert(1)&gt;&amp;&#34;q&#34;" in text
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    page = Page(text)
    assert evil in page.text  # shown as the text it is
    assert "Not evaluated on the test split yet" in page.text
    assert "No galleries yet" in page.text and page.imgs == []
    with pytest.raises(ValueError, match="no config.yaml.*not a kerasfrac run directory"):
        report_html.render_run(tmp_path / "nothing")


@pytest.mark.slow
def test_explain_adds_its_part(html_run, tmp_path):
    from kerasfrac.explain import explain_run
    from kerasfrac.options import ExplainOptions

    run = tmp_path / "run"
    shutil.copytree(html_run, run)
    result = explain_run(run, ExplainOptions(what=("grad-cam", "audit"), n_images=4))
    assert result["report_html"] == str(run / "report.html")
    page = Page((run / "report.html").read_text())
    assert "No explanations yet" not in page.text
    assert "CAM overlays of the explained images" in page.text
    assert "Pointing game not available" in page.text
    assert "border" in page.text
    explain_figures = [Path(f).name for f in result["figures"]]
    assert "grad_cam.png" in explain_figures
    # the galleries and figures are still there, and one more image per explain figure
    before = Page((html_run / "report.html").read_text())
    assert len(page.imgs) == len(before.imgs) + len(explain_figures)
    assert page.groups == before.groups


@pytest.mark.slow
def test_report_html_compares_runs(html_run, boxed_run, tmp_path, capsys):
    out = tmp_path / "cmp" / "runs.html"
    out.parent.mkdir()
    assert main(["report", str(html_run), str(boxed_run), "--html", str(out)]) == 0
    assert f"written: {out}" in capsys.readouterr().out
    text = out.read_text()
    page = Page(text)
    # both runs are named "run": each row links its own page
    linked = {(out.parent / link).resolve() for link in page.links}
    assert linked == {(html_run / "report.html").resolve(), (boxed_run / "report.html").resolve()}
    assert text.count('<tr data-run="run">') == 2
    names = {f"{d.parent.name}/run" for d in (html_run, boxed_run)}  # same name: parent added
    assert all(name in page.text for name in names)
    assert "None" not in page.text  # metrics without epochs: "? of 5"
    assert "Architecture" in page.text and "Image size" in page.text
    assert len(page.imgs) == 1 and decode_data_uri(page.imgs[0]).format == "PNG"
    assert "script" not in page.tags
    text_table = tmp_path / "table.md"
    bad = ["report", str(html_run), "--out", str(text_table), "--html", str(tmp_path / "r.txt")]
    assert main(bad) == 2
    assert "expected a file name ending in .html" in capsys.readouterr().err
    assert not text_table.exists()  # refused before any output


def test_a_given_split_is_said_beside_every_figure(html_run, tmp_path):
    """A run evaluated on a build whose split was given (--split-file, MURA's official valid):
    the run page says so at the headline, the metrics, the subgroups, the figures and the
    galleries (and the explanations, once there), and the comparison page beside its table
    and ROC curves."""
    run = tmp_path / "given" / "run"
    shutil.copytree(html_run, run)
    m = json.loads((run / "metrics.json").read_text())
    note = "the split was given by --split-file published.csv (image by image)"
    m["split_given"] = {"by": "--split-file", "note": note}
    (run / "metrics.json").write_text(json.dumps(m))
    text = report_html.render_run(run)
    sections = re.split(r'<h2 id="', text)
    said = {s.split('"', 1)[0] for s in sections[1:] if note in s}
    assert {"metrics", "subgroups", "figures", "galleries"} <= said
    assert note in sections[0].split("<nav>")[0].split('id="glance"')[1]  # the headline
    out = tmp_path / "cmp.html"
    report_html.write_compare(out, [run, html_run])
    page = Page(out.read_text())
    assert f"Split given, not drawn by kerasfrac: given/run ({note})" in page.text
    roc = out.read_text().split('id="roc"')[1]
    assert note in roc.split("</figcaption>")[0]  # in the ROC figure's caption
    # a drawn split: no such note on either page
    assert "Split given" not in Page(report_html.render_run(html_run)).text
    report_html.write_compare(out, [html_run])
    assert "Split given, not drawn" not in Page(out.read_text()).text


# --------------------------------------------------------------------------- a real browser

#: Injected into a copy of the page only under test: after load, how many <img> there are,
#: how many did not decode, and where the galleries start (px from the top at the window's
#: width), as attributes of <body> (read back from --dump-dom).
PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = document.querySelectorAll("img"), broken = 0;
  imgs.forEach(function (i) { if (!i.complete || i.naturalWidth === 0) broken++; });
  document.body.setAttribute("data-images", imgs.length);
  document.body.setAttribute("data-broken", broken);
  var g = document.getElementById("galleries");
  if (g) {
    var top = Math.round(g.getBoundingClientRect().top + window.scrollY);
    document.body.setAttribute("data-galleries", top);
  }
});
</script>"""
WIDTH = 1280  # px, the browser window's width


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def with_probe(text: str) -> str:
    """The page with ``PROBE`` before </body>, its CSP opened to that inline script only."""
    csp = f'content="{escape(report_html.CSP)}"'  # as the template writes it
    assert csp in text and text.count("</body>") == 1
    opened = f'content="{escape(report_html.CSP)}; script-src &#39;unsafe-inline&#39;"'
    return text.replace(csp, opened).replace("</body>", PROBE + "</body>")


def chromium_run(page: Path, height: int, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` with the network off: every request goes to a proxy at
    a closed port (loopback included), and the page's own CSP allows data: images only."""
    profile = tempfile.mkdtemp(prefix="kerasfrac-chromium-")  # parallel workers: one each
    argv = [
        chromium(),
        f"--user-data-dir={profile}",
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--hide-scrollbars",
        f"--window-size={WIDTH},{height}",
        *args,
        page.resolve().as_uri(),
    ]
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def browse(page: Path) -> tuple[dict, list[str]]:
    """``({body's data-* numbers}, console lines)`` of ``page`` (with ``PROBE``) loaded."""
    run = chromium_run(page, 1500, "--dump-dom")
    body = re.search(r"<body([^>]*)>", run.stdout)
    assert body, f"no <body> in Chromium's DOM dump: {run.stdout[:500]!r}"
    attrs = {k: int(v) for k, v in re.findall(r'(data-[a-z]+)="(\d+)"', body.group(1))}
    return attrs, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def docs_screenshot(shot: Image.Image, galleries: int, path: str) -> None:
    """The top of the page above the start of its galleries, scaled to 70% as a palette
    PNG (README's picture, docs/report-html.png)."""
    top = shot.crop((0, 0, WIDTH, 1000))
    low = shot.crop((0, galleries - 10, WIDTH, galleries + 900))
    both = Image.new("RGB", (WIDTH, top.height + low.height + 12), "#888888")
    both.paste(top, (0, 0))
    both.paste(low, (0, top.height + 12))
    small = both.resize((int(WIDTH * 0.7), int(both.height * 0.7)), Image.LANCZOS)
    small.quantize(colors=96).save(path, optimize=True)


def require_chromium() -> None:
    """Skip (with the reason) where there is no Chromium, unless KERASFRAC_REQUIRE_BROWSER=1
    (.ci/run): then fail."""
    if chromium() is None:
        if os.environ.get("KERASFRAC_REQUIRE_BROWSER") == "1":
            pytest.fail(
                "KERASFRAC_REQUIRE_BROWSER=1 but no `chromium` on PATH (.ci/run installs it)"
            )
        pytest.skip("no `chromium` on PATH: install Debian's chromium package to run this test")


@pytest.mark.slow
def test_page_in_a_real_browser(html_run, tmp_path):
    """Chromium (network off) loads the page: every image decodes, nothing is logged on the
    console, and a screenshot is taken down to the galleries. A control page with a broken
    image and a console error proves the checks can fail. KERASFRAC_SAVE_SCREENSHOT=PATH
    keeps the screenshot's top and galleries (docs/report-html.png is made so)."""
    require_chromium()
    control = tmp_path / "control.html"
    control.write_text(
        with_probe(
            f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
            f'content="{escape(report_html.CSP)}"></head><body>'
            '<img src="data:image/png;base64,AAAA"><img src="http://example.com/x.png">'
            '<script>console.error("control")</script></body></html>'
        )
    )
    attrs, console = browse(control)
    assert attrs == {"data-images": 2, "data-broken": 2}, attrs
    assert console, "Chromium logged no console line for the control page's error"

    page = tmp_path / "report.html"
    page.write_text(with_probe((html_run / "report.html").read_text()))
    attrs, console = browse(page)
    n_img = len(Page((html_run / "report.html").read_text()).imgs)
    assert (attrs["data-images"], attrs["data-broken"]) == (n_img, 0), attrs
    assert console == []
    galleries = attrs["data-galleries"]
    assert 1000 < galleries < 10000, galleries
    shot = tmp_path / "report.png"
    chromium_run(page, galleries + 900, f"--screenshot={shot}")
    image = Image.open(shot).convert("L")
    assert image.size == (WIDTH, galleries + 900)
    for part in ((0, 0, WIDTH, 1000), (0, galleries, WIDTH, galleries + 900)):
        assert len(np.unique(np.asarray(image.crop(part)))) > 20, part  # drawn, not blank
    keep = os.environ.get("KERASFRAC_SAVE_SCREENSHOT")
    if keep:
        docs_screenshot(Image.open(shot).convert("RGB"), galleries, keep)


@pytest.mark.slow
def test_compare_page_in_a_real_browser(html_run, boxed_run, tmp_path):
    """The page of `kerasfrac report --html`: its ROC figure decodes, no console message."""
    require_chromium()
    out = report_html.write_compare(tmp_path / "runs.html", [html_run, boxed_run])
    page = tmp_path / "probed.html"
    page.write_text(with_probe(out.read_text()))
    attrs, console = browse(page)
    assert (attrs["data-images"], attrs["data-broken"]) == (1, 0), attrs
    assert console == []
