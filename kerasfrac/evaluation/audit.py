"""`kerasfrac audit DATA_DIR`: a data card of a build, and what a model that never sees a bone
would score on it.

The card: counts by class and split, image sizes by class, the duplicate and near-duplicate
summary of the manifest, and the **no-anatomy baseline**: scikit-learn's
HistGradientBoostingClassifier trained on the train split's non-anatomical features only,

* ``size``: height, width, aspect, pixels, channels;
* ``file``: stored bytes, bytes per pixel, PNG or JPEG, JPEG flags (progressive, EXIF, JFIF,
  ICC, Adobe, restart markers, APPn count) and the first luminance quantisation value;
* ``thumbnail``: intensity statistics of a small grayscale copy (mean, spread, percentiles,
  dark and bright shares, border vs centre) -- burnt-in markers, exposure, collimation;
* ``metadata``: the build's metadata columns (FracAtlas: body part, hardware, view from the
  records, never ``fractured``/``fracture_count``, which are the label; MURA: region;
  GRAZPEDWRI-DX: projection, laterality, age, ...; a CSV: its metadata columns: the
  manifest's ``metadata`` block, ``tfrecords_builder.metadata``; a categorical column is one
  0/1 feature per value),

with its test AUROC (percentile-bootstrap CI), each family alone, and each feature's own
AUROC. A classifier's AUROC is only news by how far it is above this one.

Thumbnails come from JPEG's reduced-size decoding (``ratio=8``: the DCT's low frequencies,
no full decode), so FracAtlas' 4,000 images take seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from kerasfrac import runs
from kerasfrac.options import AuditOptions
from tfrecords_builder import metadata, schema

# Local imports of the reader and metrics: the audit's features import without TensorFlow.

#: Metadata columns that are (or count) the label: never features.
LABEL_COLUMNS = ("fractured", "fracture_count")
FAMILIES = ("size", "file", "thumbnail", "metadata")
THUMB_RATIO = 8  # JPEG decoded at 1/8 scale
THUMB_SIDE = 64  # PNGs (and the JPEG thumbnails) resized to 64x64 for the statistics


@dataclasses.dataclass
class Table:
    """One split's features: ``x`` [n, features], ``names``, ``family`` per feature."""

    ids: list[str]
    labels: np.ndarray
    x: np.ndarray
    names: list[str]
    family: list[str]
    meta: dict[str, np.ndarray]
    groups: list[str]


# --------------------------------------------------------------------------- features


def jpeg_flags(data: bytes) -> dict[str, float]:
    """Flags read from a JPEG's markers up to the scan: what encoder wrote it, not what it
    shows. Non-JPEG data gives zeros."""
    flags = {
        "progressive": 0.0,
        "exif": 0.0,
        "jfif": 0.0,
        "icc": 0.0,
        "adobe": 0.0,
        "restart": 0.0,
        "app_segments": 0.0,
        "quant0": 0.0,
    }
    if not data.startswith(b"\xff\xd8"):
        return flags
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end: header done
            break
        length = (data[i + 2] << 8) | data[i + 3]
        body = data[i + 4 : i + 2 + length]
        if 0xE0 <= marker <= 0xEF:
            flags["app_segments"] += 1
            flags["jfif"] = max(flags["jfif"], float(body.startswith(b"JFIF")))
            flags["exif"] = max(flags["exif"], float(body.startswith(b"Exif")))
            flags["icc"] = max(flags["icc"], float(body.startswith(b"ICC_PROFILE")))
            flags["adobe"] = max(flags["adobe"], float(body.startswith(b"Adobe")))
        elif marker == 0xC2:
            flags["progressive"] = 1.0
        elif marker == 0xDD:
            flags["restart"] = 1.0
        elif marker == 0xDB and body and not flags["quant0"]:
            precision = body[0] >> 4
            flags["quant0"] = float(
                body[1] if precision == 0 else (body[1] << 8 | body[2]) if len(body) > 2 else 0
            )
        i += 2 + length
    return flags


def thumbnail_stats(gray: np.ndarray) -> dict[str, float]:
    """Intensity statistics of a grayscale thumbnail (uint8 or float, 0-255)."""
    g = np.asarray(gray, dtype=np.float64)
    h, w = g.shape
    bh, bw = max(1, h // 10), max(1, w // 10)
    border = np.concatenate(
        [g[:bh].ravel(), g[-bh:].ravel(), g[:, :bw].ravel(), g[:, -bw:].ravel()]
    )
    centre = g[h // 4 : h - h // 4, w // 4 : w - w // 4]
    p = np.percentile(g, [1, 5, 25, 50, 75, 95, 99])
    return {
        "mean": g.mean(),
        "std": g.std(),
        **{f"p{q}": v for q, v in zip((1, 5, 25, 50, 75, 95, 99), p)},
        "dark_share": float(np.mean(g < 16)),
        "bright_share": float(np.mean(g > 239)),
        "border_mean": border.mean(),
        "centre_mean": centre.mean(),
        "corner_max": max(
            g[:bh, :bw].mean(), g[:bh, -bw:].mean(), g[-bh:, :bw].mean(), g[-bh:, -bw:].mean()
        ),
    }


def _thumbnail(encoded: bytes, fmt: str) -> np.ndarray:
    import tensorflow as tf

    if fmt == "jpeg":
        try:
            pixels = tf.io.decode_jpeg(encoded, channels=1, ratio=THUMB_RATIO)
        except tf.errors.InvalidArgumentError:
            pixels = tf.io.decode_jpeg(encoded, channels=1, try_recover_truncated=True)
    else:
        pixels = tf.io.decode_image(encoded, channels=1, expand_animations=False)
    small = tf.image.resize(tf.cast(pixels, tf.float32), (THUMB_SIDE, THUMB_SIDE), method="area")
    return small.numpy()[..., 0]


def _build(build):
    """``build`` itself, or the build in that directory (``tfrecords_builder.reader.Build``)."""
    from tfrecords_builder.reader import Build

    return build if isinstance(build, Build) else Build.load(build)


def features(build, split: str) -> Table:
    """The non-anatomical features of every image of ``split`` of ``build`` (a ``Build`` or
    its directory), records in read order."""
    build = _build(build)
    ids, labels, rows, meta, groups = [], [], [], {c: [] for c in schema.META_COLUMNS}, []
    for ex in build.read(split, decode=False).as_numpy_iterator():
        encoded, fmt = ex["encoded"], ex["format"].decode()
        h, w, c = int(ex["height"]), int(ex["width"]), int(ex["channels"])
        size = {"height": h, "width": w, "aspect": h / w, "pixels": h * w, "channels": c}
        file = {
            "bytes": len(encoded),
            "bytes_per_pixel": len(encoded) / (h * w),
            "png": float(fmt == "png"),
            **{f"jpeg_{k}": v for k, v in jpeg_flags(encoded).items()},
        }
        thumb = thumbnail_stats(_thumbnail(encoded, fmt))
        rows.append(
            [("size", k, v) for k, v in size.items()]
            + [("file", k, v) for k, v in file.items()]
            + [("thumbnail", k, v) for k, v in thumb.items()]
        )
        ids.append(ex["image_id"].decode())
        labels.append(int(ex["label"]))
        groups.append(ex["group"].decode())
        for col in schema.META_COLUMNS:
            meta[col].append(int(ex["meta"][col]))
    meta_arr = {k: np.array(v, dtype=int) for k, v in meta.items()}
    known = [c for c in schema.META_COLUMNS if c not in LABEL_COLUMNS and np.any(meta_arr[c] >= 0)]
    names = [f"{fam}.{k}" for fam, k, _ in rows[0]] if rows else []
    family = [fam for fam, _, _ in rows[0]] if rows else []
    x = np.array([[v for _, _, v in r] for r in rows], dtype=np.float64).reshape(len(rows), -1)
    if known:
        m = np.stack([meta_arr[c] for c in known], axis=1).astype(np.float64)
        m[m < 0] = np.nan  # unknown: HistGradientBoosting handles missing values
        x = np.concatenate([x, m], axis=1)
        names += [f"metadata.{c}" for c in known]
        family += ["metadata"] * len(known)
    x, names, family = _table_metadata(build, ids, x, names, family, meta_arr)
    return Table(ids, np.array(labels, dtype=int), x, names, family, meta_arr, groups)


def _table_metadata(build, ids, x, names, family, meta_arr):
    """The build's metadata.csv columns (``tfrecords_builder.metadata``; none for FracAtlas'
    records and older builds) appended as ``metadata.*`` features, unknown as NaN; its region
    column goes to ``meta_arr["region"]`` (text per image) for the subgroups."""
    table = metadata.read(build.dir, build.manifest)
    if table is None:
        return x, names, family
    missing = [i for i, r in zip(ids, table.rows(ids)) if r < 0]
    if missing:
        raise metadata.MetadataError(
            f"{len(missing)} image(s) of {str(build.dir)!r} (e.g. {missing[0]!r}) have no row in "
            f"its {metadata.TABLE}: the build was edited. Rebuild it: "
            f"`{build.rebuild_command()}`"
        )
    x = np.concatenate([x, table.take(table.features, ids, np.nan)], axis=1)
    names = names + [f"metadata.{n}" for n in table.names]
    family = family + ["metadata"] * len(table.names)
    if table.region is not None:
        meta_arr["region"] = table.take(table.region, ids, "")
    return x, names, family


# --------------------------------------------------------------------------- the baseline


def fit_baseline(train: Table, columns: list[int] | None = None, seed: int = 0):
    """HistGradientBoostingClassifier on the train split's features (all or ``columns``)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    if len(np.unique(train.labels)) < 2:
        raise ValueError(
            "the no-anatomy baseline needs both classes in the train split; it has only "
            f"{'fractured' if train.labels.all() else 'normal'} images"
        )
    from threadpoolctl import threadpool_limits

    cols = list(range(train.x.shape[1])) if columns is None else columns
    model = HistGradientBoostingClassifier(
        max_iter=200,
        learning_rate=0.05,
        max_leaf_nodes=15,
        l2_regularization=1.0,
        random_state=seed,
    )
    # One OpenMP thread: on a few thousand rows threads only wait for each other (on a busy
    # 2-core machine a 120-row fit took 11 s with the default threads).
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(train.x[:, cols], train.labels)
    return model, cols


def predict(model, x: np.ndarray) -> np.ndarray:
    """P(fractured) of a fitted baseline (one OpenMP thread, as in ``fit_baseline``)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        return model.predict_proba(x)[:, 1]


def baseline_probabilities(build, split: str = "test", seed: int = AuditOptions.seed) -> dict:
    """``{"ids", "labels", "probs", "probs_without_metadata", "groups", "meta", "height",
    "width"}``: the no-anatomy baseline (all feature families, fitted on train) applied to
    ``split``; ``probs_without_metadata`` (None where the records carry no metadata): the
    same without the dataset's metadata columns (image and file statistics only)."""
    build = _build(build)
    train = features(build, "train")
    test = features(build, split)
    model, cols = fit_baseline(train, seed=seed)
    probs = predict(model, test.x[:, cols])
    without = None
    if "metadata" in train.family:
        plain = [j for j, f in enumerate(train.family) if f != "metadata"]
        model, cols = fit_baseline(train, plain, seed=seed)
        without = predict(model, test.x[:, cols])
    return {
        "ids": test.ids,
        "labels": test.labels,
        "probs": probs,
        "probs_without_metadata": without,
        "groups": test.groups,
        "meta": test.meta,
        "height": test.x[:, test.names.index("size.height")],
        "width": test.x[:, test.names.index("size.width")],
    }


def feature_aurocs(table: Table) -> list[dict]:
    """Each feature's own AUROC on ``table`` (0.5 = no signal; below 0.5 = larger values mean
    normal), strongest first; features without variation or with one class are left out."""
    from sklearn.metrics import roc_auc_score

    out = []
    if len(np.unique(table.labels)) < 2:
        return out
    for j, name in enumerate(table.names):
        v = table.x[:, j]
        ok = np.isfinite(v)
        if ok.sum() < 2 or np.unique(v[ok]).size < 2 or len(np.unique(table.labels[ok])) < 2:
            continue
        auc = float(roc_auc_score(table.labels[ok], v[ok]))
        out.append({"feature": name, "auroc": auc, "strength": abs(auc - 0.5)})
    return sorted(out, key=lambda d: -d["strength"])


def size_table(tables: dict[str, Table], top: int = 8) -> list[dict]:
    """The most common image sizes (height x width) over all splits, with counts by class."""
    counts: dict[str, list[int]] = {}
    for t in tables.values():
        hi, wi = t.names.index("size.height"), t.names.index("size.width")
        for row, y in zip(t.x, t.labels):
            key = f"{int(row[hi])}x{int(row[wi])}"
            counts.setdefault(key, [0, 0])[int(y)] += 1
    rows = [
        {"size": k, "normal": v[0], "fractured": v[1], "fractured_share": v[1] / (v[0] + v[1])}
        for k, v in counts.items()
    ]
    rows.sort(key=lambda r: -(r["normal"] + r["fractured"]))
    if len(rows) > top:
        rest = rows[top:]
        n0 = sum(r["normal"] for r in rest)
        n1 = sum(r["fractured"] for r in rest)
        rows = rows[:top] + [
            {
                "size": f"other ({len(rest)} sizes)",
                "normal": n0,
                "fractured": n1,
                "fractured_share": n1 / max(1, n0 + n1),
            }
        ]
    return rows


def audit(
    build_dir,
    out_dir=None,
    *,
    seed: int = AuditOptions.seed,
    n_bootstrap: int = AuditOptions.n_bootstrap,
    verify: bool = AuditOptions.verify,
) -> dict:
    """Audit a build: writes ``audit.json``, ``audit.md`` and ``audit.png`` into ``out_dir``
    (default ``BUILD_DIR/audit``, checked writable first) and returns the JSON dict.
    ``verify``: every record read and each shard's sha256 compared with the manifest first.
    Counts by class that differ from the manifest's raise (the manifest was edited)."""
    from kerasfrac.evaluation.metrics import auroc_ci

    build_dir = Path(build_dir)
    build = _build(build_dir)
    manifest = build.manifest
    out_dir = runs.check_writable(out_dir if out_dir else build_dir / "audit")
    verified = build.verify(hashes=True) if verify else None
    tables = {s: features(build, s) for s in schema.SPLITS}
    _check_class_counts(build, tables)
    train, test = tables["train"], tables["test"]
    if test.labels.size == 0:
        raise ValueError(f"the test split of {str(build_dir)!r} is empty: nothing to audit")

    def score(cols: list[int]) -> dict:
        model, cols = fit_baseline(train, cols, seed)
        p = predict(model, test.x[:, cols])
        ci = auroc_ci(test.labels, p, groups=test.groups, n_resamples=n_bootstrap, seed=seed)
        return {"features": [train.names[c] for c in cols], **ci}

    baseline = {"all": score(list(range(train.x.shape[1])))}
    if "metadata" in train.family:
        baseline["all_but_metadata"] = score(
            [j for j, f in enumerate(train.family) if f != "metadata"]
        )
    for fam in FAMILIES:
        cols = [j for j, f in enumerate(train.family) if f == fam]
        if cols:
            baseline[fam] = score(cols)
    counts = {
        s: {"fractured": int(t.labels.sum()), "normal": int((t.labels == 0).sum())}
        for s, t in tables.items()
    }
    near = manifest.get("near_duplicates") or {}
    result = {
        "build": str(build_dir),
        "source": manifest.get("source"),
        "counts": counts,
        "image_sizes": size_table(tables),
        "duplicates": {
            "byte_identical": manifest.get("duplicate_summary"),
            "near_duplicates": {k: v for k, v in near.items() if k != "pair_list"} or None,
            "near_duplicate_pairs": manifest.get("near_duplicate_pairs"),
            "near_duplicates_across_splits": len(manifest.get("near_duplicates_across_splits", [])),
            "quarantine_reasons": manifest.get("quarantine_reasons"),
        },
        "baseline": {
            "model": "sklearn HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, "
            "max_leaf_nodes=15, l2_regularization=1.0), fitted on train, scored on test",
            "seed": seed,
            "auroc": baseline,
        },
        "feature_auroc_test": feature_aurocs(test),
    }
    if verified is not None:
        hashed = bool(manifest.get("shard_sha256"))
        result["verified"] = {"records": verified, "sha256_checked": hashed}
    runs.write_text(out_dir / "audit.json", json.dumps(result, indent=2, default=float) + "\n")
    result["figure"] = str(_figure(out_dir / "audit.png", tables, result))
    runs.write_text(out_dir / "audit.md", markdown(result))
    return result


def _check_class_counts(build, tables: dict) -> None:
    """The labels read from the records against the manifest's counts per split and class."""
    from tfrecords_builder.reader import BuildOutputError

    for split, t in tables.items():
        read = {"fractured": int(t.labels.sum()), "normal": int((t.labels == 0).sum())}
        listed = {name: build.counts(split)[label] for label, name in schema.LABEL_NAMES.items()}
        if read != listed:
            raise BuildOutputError(
                f"the {split!r} split of {str(build.dir)!r} holds {read} by its records' labels, "
                f"but its manifest.json counts {listed}: the manifest was edited or damaged "
                f"(training would use the wrong counts). Rebuild it: `{build.rebuild_command()}`"
            )


def _fmt_ci(d: dict) -> str:
    if d.get("auroc") is None:
        return "n/a"
    ci = d.get("ci95")
    return f"{d['auroc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def markdown(r: dict) -> str:
    lines = [f"# Data card: {r['build']}", "", f"Source: {r['source']}", ""]
    if r.get("verified"):
        v = r["verified"]
        sums = (
            "each shard's sha256 matches the manifest"
            if v["sha256_checked"]
            else ("the manifest records no sha256 (built before kerasfrac recorded them)")
        )
        lines += [f"Verified: {sum(v['records'].values())} records read without error; {sums}.", ""]
    lines += ["## Counts", ""]
    lines += ["| split | fractured | normal | fractured share |", "|---|--:|--:|--:|"]
    for s, c in r["counts"].items():
        n = c["fractured"] + c["normal"]
        lines.append(
            f"| {s} | {c['fractured']} | {c['normal']} | {c['fractured'] / max(1, n):.1%} |"
        )
    lines += [
        "",
        "## Image sizes by class",
        "",
        "| size (HxW) | fractured | normal | fractured share |",
    ]
    lines.append("|---|--:|--:|--:|")
    for row in r["image_sizes"]:
        lines.append(
            f"| {row['size']} | {row['fractured']} | {row['normal']} | "
            f"{row['fractured_share']:.1%} |"
        )
    d = r["duplicates"]
    lines += ["", "## Duplicates", ""]
    if d["byte_identical"]:
        b = d["byte_identical"]
        lines.append(f"- byte-identical groups: {b['groups']} holding {b['files_in_groups']} files")
    n = d["near_duplicates"]
    if n:
        lines.append(
            f"- near-duplicates (hash distance <= {n['distance']}, one aspect): "
            f"{n['pairs']} pairs, "
            f"{n['same_image_pairs']} the same image by the pixel check; "
            f"{'grouped' if n['grouped'] else 'NOT grouped'} ({n['groups_merged']} groups merged, "
            f"{n['images_in_merged_groups']} images); label conflicts quarantined: "
            f"{n['conflicts_quarantined']} images"
        )
    else:
        lines.append(f"- near-duplicate pairs: {d['near_duplicate_pairs']} (an older build)")
    lines.append(f"- near-duplicate pairs across splits: {d['near_duplicates_across_splits']}")
    shown = ", ".join(f"{k}: {v}" for k, v in (d["quarantine_reasons"] or {}).items())
    lines.append(f"- quarantined: {shown or 'none'}")
    b = r["baseline"]
    lines += ["", "## The no-anatomy baseline", "", b["model"] + ".", ""]
    lines += ["| features | test AUROC [95% CI] |", "|---|--:|"]
    for fam, v in b["auroc"].items():
        lines.append(f"| {fam} | {_fmt_ci(v)} |")
    lines += [
        "",
        "A model of the pixels is only better than this by the difference, with a paired CI "
        "(`kerasfrac evaluate` reports it).",
        "",
        "## Strongest single features (test AUROC; below 0.5: larger means normal)",
        "",
        "| feature | AUROC |",
        "|---|--:|",
    ]
    for f in r["feature_auroc_test"][:15]:
        lines.append(f"| {f['feature']} | {f['auroc']:.3f} |")
    lines += ["", f"![audit figure]({Path(r['figure']).name})", ""]
    return "\n".join(lines)


def _figure(path: Path, tables: dict[str, Table], r: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    sizes = r["image_sizes"]
    y = np.arange(len(sizes))
    ax[0].barh(y, [s["normal"] for s in sizes], label="normal", color="tab:blue")
    ax[0].barh(
        y,
        [s["fractured"] for s in sizes],
        left=[s["normal"] for s in sizes],
        label="fractured",
        color="tab:red",
    )
    ax[0].set_yticks(y, [f"{s['size']} ({s['fractured_share']:.0%})" for s in sizes], fontsize=7)
    ax[0].invert_yaxis()
    ax[0].set_title("image sizes by class (fractured share)")
    ax[0].set(xlabel="images", ylabel="image size (fractured share)")
    ax[0].legend(fontsize=7)
    feats = r["feature_auroc_test"][:12]
    ax[1].barh(range(len(feats)), [f["auroc"] - 0.5 for f in feats], left=0.5, color="gray")
    ax[1].set_yticks(range(len(feats)), [f["feature"] for f in feats], fontsize=7)
    ax[1].invert_yaxis()
    ax[1].axvline(0.5, color="k", lw=0.8)
    ax[1].set_xlim(0.2, 0.8)
    ax[1].set(xlabel="test AUROC of the feature alone", ylabel="feature")
    allf = r["baseline"]["auroc"]["all"]
    ax[1].set_title(f"single-feature test AUROC; baseline (all): {_fmt_ci(allf)}", fontsize=8)
    fig.tight_layout()
    runs.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def main(data_dir, opts: AuditOptions) -> int:
    """``kerasfrac audit``: see ``cli.add_audit``."""
    r = audit(data_dir, opts.out, seed=opts.seed, n_bootstrap=opts.n_bootstrap, verify=opts.verify)
    print(markdown(r))
    if r.get("verified"):
        v = r["verified"]
        sums = "each shard's sha256 matches" if v["sha256_checked"] else "no sha256 recorded"
        print(f"verified: {sum(v['records'].values())} records read without error; {sums}")
    out = Path(opts.out) if opts.out else Path(data_dir) / "audit"
    print(f"written: {out / 'audit.md'}, {out / 'audit.json'}, {out / 'audit.png'}")
    return 0
