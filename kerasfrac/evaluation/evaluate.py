"""A run on a split: predictions -> metrics -> plots.

``evaluate_run(run_dir)`` does the whole job for a training run directory: predictions for
the split (and for val, to choose the threshold) read from the run's predictions files or
computed with its model (``kerasfrac.runs``), the exact metrics of
``kerasfrac.evaluation.metrics`` with bootstrap CIs, the no-anatomy baseline of
``kerasfrac.evaluation.audit`` beside the model
(``baseline_comparison``), plots and TensorBoard images, metrics.json (written by
``runs.write_metrics``), and report.html with its galleries of test images
(``kerasfrac.evaluation.html``). ``summary`` prints a metrics dict for a person.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from kerasfrac import runs
from kerasfrac.evaluation import html, plots
from kerasfrac.evaluation.metrics import (
    MIN_PER_CLASS_FOR_CI,
    REGION_COLUMNS,
    SUBGROUP_COLUMNS,
    body_region,
    resampling,
    split_metrics,
    study_metrics,
)
from kerasfrac.names import SPLITS
from kerasfrac.options import EvaluateOptions
from tfrecords_builder import metadata

#: Subgroups of the baseline comparison: regions in this order, then views.
REGION_ORDER = (*REGION_COLUMNS, "mixed", "unknown")
VIEW_COLUMNS = ("frontal", "lateral", "oblique")

# Local imports of TensorFlow-based modules: a run's files are checked before TensorFlow.


def _check_matches(path: Path, split: str, ids, labels, want_ids, want_labels) -> None:
    if sorted(ids) != sorted(want_ids):
        extra = sorted(set(ids) - set(want_ids))
        lacking = sorted(set(want_ids) - set(ids))
        example = (extra or lacking or ["(duplicates)"])[0]
        raise ValueError(
            f"{str(path)!r} does not hold predictions of the {split!r} split "
            f"({len(ids)} rows vs {len(want_ids)} images; e.g. {example!r} differs): it is from "
            "another split or another build. Delete it or pass --recompute."
        )
    want = dict(zip(want_ids, want_labels))
    wrong = [i for i, y in zip(ids, labels) if want[i] != int(y)]
    if wrong:
        raise ValueError(
            f"{str(path)!r}: labels of {len(wrong)} images (e.g. {wrong[0]!r}) differ from the "
            f"{split!r} split; it is from another build. Delete it or pass --recompute."
        )


def _read_cached(path: Path, want_ids: list[str]):
    """The run's predictions file of a split, or None where there is none or it is empty or
    cut short (an older kerasfrac, a kill or a full disk mid-write): then it is recomputed.
    A whole file of another split or build is read, and refused by ``_check_matches``."""
    if not path.is_file():
        return None
    text = path.read_bytes()
    ids = None
    if text.endswith(b"\n"):
        try:
            ids, labels, probs = runs.read_predictions(path)
        except ValueError:
            ids = None
    if ids is not None and not (len(ids) < len(want_ids) and set(ids) <= set(want_ids)):
        return ids, labels, probs
    print(f"note: {path} is empty or incomplete; the predictions are computed again", flush=True)
    return None


@dataclasses.dataclass
class Predictions:
    """A split's predictions with what the metrics need beside them, aligned with ``ids``:
    labels, probabilities, the subgroup metadata columns, the duplicate groups (the bootstrap's
    resampling unit), and whether they were ``"read"`` from the run or ``"computed"``."""

    ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    meta: dict[str, np.ndarray]
    groups: list[str]
    source: str


def _split_predictions(
    run_dir, cfg, build, model, split, batch_size, recompute, write
) -> Predictions:
    """The ``Predictions`` of ``split``: read from the run's file where it holds this split,
    else computed with ``model`` (and written where ``write``)."""
    from kerasfrac import data

    records = data.split_records(build, split)
    want_ids, want_labels = records.ids, records.labels
    if not want_ids:
        raise ValueError(f"the {split!r} split of {cfg.data.dir!r} is empty: nothing to evaluate")
    path = runs.predictions_path(run_dir, split)
    cached = None if recompute else _read_cached(path, want_ids)
    if cached is not None:
        ids, labels, probs = cached
        _check_matches(path, split, ids, labels, want_ids, want_labels)
        source = "read"
    else:
        ds = data.make_eval_dataset(build, split, cfg.data, batch_size, with_ids=True)
        ids, labels, probs = runs.predict(model, ds, cfg.eval.tta)
        # Metrics of exactly what predictions.csv holds (6 decimals), computed or read back.
        probs = np.round(probs, 6)
        if write:
            runs.write_predictions(path, ids, labels, probs)
        source = "computed"
    position = {image_id: k for k, image_id in enumerate(want_ids)}
    order = [position[i] for i in ids]
    meta = {c: records.meta[c][order] for c in SUBGROUP_COLUMNS if c in records.meta}
    table = metadata.read(build.dir, build.manifest)  # a region column of metadata.csv
    if table is not None and table.region is not None:
        meta["region"] = table.take(table.region, ids, "")
    groups = [records.groups[k] for k in order]
    return Predictions(ids, labels, probs, meta, groups, source)


def split_groups(build, split: str, ids) -> list[str]:
    """The build's duplicate group of each of ``ids`` (images of ``split``): the unit the
    bootstrap of ``evaluate`` and of ``train``'s end resamples."""
    from kerasfrac import data

    records = data.split_records(build, split)
    group = dict(zip(records.ids, records.groups))
    missing = [i for i in ids if i not in group]
    if missing:
        raise ValueError(
            f"{len(missing)} predicted image(s) (e.g. {missing[0]!r}) are not in the "
            f"{split!r} split of {str(build)!r}; predict on that build's split"
        )
    return [group[i] for i in ids]


def end_of_training_metrics(build, split: str, ids, labels, probs) -> dict:
    """``train``'s closing metrics of ``split``: exactly those ``kerasfrac evaluate`` gives
    the same predictions (rounded as predictions.csv holds them, the build's duplicate groups
    resampled, evaluate's default bootstrap and seed), so the two print one CI."""
    opts = EvaluateOptions()
    return split_metrics(
        labels,
        np.round(np.asarray(probs, np.float64), 6),
        n_bootstrap=opts.n_bootstrap,
        seed=opts.seed,
        groups=split_groups(build, split, ids),
    )


def evaluate_run(
    run_dir: str | Path,
    split: str | None = None,
    model_path: str | Path | None = None,
    opts: EvaluateOptions | None = None,
    **changes,
) -> dict:
    """Evaluate a training run on ``split`` (test, val or train); write metrics, plots,
    predictions.

    Predictions of the split and of val (whose Youden-J threshold is applied to the split)
    are read from the run's predictions files when present and matching the split, else
    computed with the model and written. ``model_path`` (another model than the run's
    model.keras) always recomputes and writes no predictions files. Writes
    ``metrics.json`` (test) or ``metrics_<split>.json`` and ``plots/<split>_*.png``, logs
    the plots to ``tensorboard/evaluation``, and (``html``) renders ``report.html``, with
    the galleries of test images remade when the split is test. Bootstrap CIs resample the
    build's duplicate groups where the split holds any. ``baseline`` adds
    ``no_anatomy_baseline`` (see ``baseline_comparison``; not on train, where the baseline
    was fitted). ``train`` measures the fit: the training images as val and test see them
    (no augmentation, inference mode), so train AUROC below val AUROC means the model
    underfits. Returns the metrics dict.

    Settings: ``opts`` (``EvaluateOptions``, its defaults where None), with ``split`` and
    ``changes`` (EvaluateOptions fields, e.g. ``n_bootstrap=0``) replacing its values.
    """
    if split is not None:
        changes["split"] = split
    opts = dataclasses.replace(opts or EvaluateOptions(), **changes)
    if opts.gallery_size < 0:
        raise ValueError(
            f"--gallery-size {opts.gallery_size}: expected 0 or more images per gallery "
            "(0 leaves the galleries empty; --no-html skips report.html)"
        )
    with runs.run_lock(run_dir, exclusive=False, command="evaluate"):  # no train meanwhile
        return _evaluate_run(run_dir, model_path, opts)


def _evaluate_run(run_dir, model_path, opts: EvaluateOptions) -> dict:
    from kerasfrac import data

    split = opts.split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    run_dir = Path(run_dir)
    cfg, model, path = runs.load_model(run_dir, model_path)
    own_model = (
        model_path is None or Path(model_path).resolve() == runs.model_path(run_dir).resolve()
    )
    recompute = opts.recompute or not own_model
    batch = opts.batch_size or cfg.train.batch_size
    build = data.check_build(cfg.data.dir, cfg.dataset)

    def predictions(which: str) -> Predictions:
        return _split_predictions(run_dir, cfg, build, model, which, batch, recompute, own_model)

    pred = predictions(split)
    val = pred if split == "val" else predictions("val")
    given = split_given(build.manifest)
    result = {"split": split, "split_given": given, **_metrics(pred, val, build, split, opts)}
    chosen = choose_on_val(val, opts)
    result.update(apply_chosen(chosen, pred, split, opts))
    studies = read_studies(build)
    if studies is not None:
        patients = bool(build.manifest.get("patients"))
        result["study_level"] = study_level(studies, pred, val, split, opts, patients)
    if own_model:  # what predict (and export) use: fitted on val, whichever split this is
        runs.write_text(runs.calibration_path(run_dir), json.dumps(chosen, indent=2) + "\n")
    if opts.plots:
        written = write_run_plots(run_dir, split, pred.labels, pred.probs, result, pred.groups)
        result["plots"] = [str(p.relative_to(run_dir)) for p in written]
    record = runs.write_metrics(
        run_dir, split, result, cfg=cfg, model=path, predictions=pred.source
    )
    if opts.html:
        if split == "test":
            write_gallery(run_dir, model, cfg, build, pred, result, opts, batch)
        html.write_run_report(run_dir)
    return record


def split_given(manifest: dict) -> dict | None:
    """metrics.json's ``split_given``: how the build's split was given rather than drawn by
    kerasfrac (``--split-file``, or the layout's official split such as MURA's valid -> test),
    with a note to print beside every figure; None where kerasfrac drew it."""
    sf = manifest.get("split_file")
    if sf:
        n = int(sf.get("groups_across_splits") or 0)
        images = int(sf.get("images_in_groups_across_splits") or 0)
        return {
            "by": "--split-file",
            "file": sf.get("file"),
            "groups_across_splits": n,
            "images_in_groups_across_splits": images,
            "note": f"the split was given by --split-file {sf.get('file')} (image by image, "
            "not drawn by kerasfrac); "
            + (
                f"{n} groups of {images} images (copies, near-duplicates, patients, studies) "
                "straddle splits, so a test image may have a relative in train (the manifest's "
                "split_file lists them)"
                if n
                else "no group (copies, near-duplicates, patients, studies) straddles splits"
            ),
        }
    given = manifest.get("given_splits")
    if given:
        groups = given.get("groups_given") or {}
        shown = ", ".join(f"{n} groups to {s}" for s, n in groups.items())
        return {
            "by": "official",
            "groups_given": groups,
            "note": (
                f"the layout's official split ({shown}, e.g. MURA's valid as test); the other "
                "groups were split by kerasfrac (grouped, stratified)"
            ),
        }
    return None


def read_studies(build) -> dict[str, str] | None:
    """``{image id: study}`` from the build's index.csv where its manifest records studies
    (MURA, GRAZPEDWRI-DX, a CSV's study_id); None where it records none."""
    if not build.manifest.get("studies"):
        return None
    path = build.dir / (build.manifest.get("index") or "index.csv")
    if not path.is_file():
        raise ValueError(
            f"{str(path)!r} is missing, but the manifest of {str(build.dir)!r} records studies: "
            f"the build was edited or damaged. Rebuild it: `{build.rebuild_command()}`"
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and "study" not in rows[0]:
        raise ValueError(
            f"{str(path)!r} has no 'study' column (columns {sorted(rows[0])}), but the manifest "
            f"records studies: rebuild it: `{build.rebuild_command()}`"
        )
    return {r["image_id"]: r["study"] for r in rows if r.get("study")}


def study_level(
    studies: dict, pred: Predictions, val: Predictions, split: str, opts, patients: bool
) -> dict:
    """metrics.json's ``study_level`` (``metrics.study_metrics``): ``pred``'s images averaged
    per study, the threshold chosen on ``val``'s studies, the build's groups (patients where
    the build has them) resampled."""

    def of(p: Predictions) -> list[str]:
        return [studies.get(i, "") for i in p.ids]

    result = study_metrics(
        of(pred),
        pred.labels,
        pred.probs,
        groups=pred.groups,
        val=(of(val), val.labels, val.probs),
        n_bootstrap=opts.n_bootstrap,
        seed=opts.seed,
    )
    if result is None:
        return {"unavailable": f"no image of the {split!r} split has a study in index.csv"}
    who = "patients" if patients else "studies (the build records no patients)"
    result["resampling_unit"] = (
        f"{who}: the build's groups, each joined with its copies and near-duplicates"
    )
    at = result["at_val_threshold"]
    if split == "val" and "chosen_on" in at:
        at["chosen_on"] = "val studies (the same split: optimistic)"
    return result


def write_gallery(run_dir, model, cfg, build, pred: Predictions, m: dict, opts, batch) -> dict:
    """report.html's galleries of the test split (``html.write_gallery``) at the threshold
    predict uses: the Youden-J one chosen on val, else ``m``'s fixed threshold."""
    youden = m.get("youden") or {}
    if youden.get("threshold") is not None:
        threshold, source = youden["threshold"], "the Youden-J threshold chosen on val"
    else:
        threshold, source = m["threshold"], "fixed: no Youden-J threshold on val"
    return html.write_gallery(
        run_dir,
        model,
        cfg,
        build,
        pred.ids,
        pred.labels,
        pred.probs,
        threshold,
        source,
        n=opts.gallery_size,
        seed=opts.seed,
        batch_size=batch,
    )


def _metrics(pred: Predictions, val: Predictions, build, split: str, opts) -> dict:
    """``split_metrics`` of ``pred`` (threshold chosen on ``val``), the no-anatomy baseline
    beside it (``opts.baseline``) and the notes a reader of that split needs."""
    has_meta = "region" in pred.meta or any(np.any(v >= 0) for v in pred.meta.values())
    result = split_metrics(
        pred.labels,
        pred.probs,
        0.5,
        val=(val.labels, val.probs),
        n_bootstrap=opts.n_bootstrap,
        seed=opts.seed,
        meta=pred.meta if has_meta else None,
        groups=pred.groups,
    )
    if opts.baseline and split == "train":
        result["no_anatomy_baseline"] = {
            "unavailable": "the baseline is fitted on the train split: no fair comparison there"
        }
    elif opts.baseline:
        result["no_anatomy_baseline"] = baseline_comparison(
            build,
            split,
            pred.ids,
            pred.labels,
            pred.probs,
            groups=pred.groups,
            n_bootstrap=opts.n_bootstrap,
            seed=opts.seed,
        )
    if split == "val" and result.get("youden"):
        result["youden"]["chosen_on"] = "val (the same split: optimistic)"
    if split == "train":
        result["note"] = (
            "the images the model was trained on, seen without augmentation in inference "
            "mode: a measure of fit, not of generalisation"
        )
    return result


def choose_on_val(val: Predictions, opts: EvaluateOptions) -> dict:
    """What is chosen on val alone: the calibrator (``calibration.fit``) and the operating
    points' thresholds (``opts.sensitivity`` / ``opts.specificity``), as calibration.json holds
    them; a calibrator that cannot be fitted (too few images of a class) is ``none`` with the
    reason."""
    from kerasfrac.evaluation import calibration
    from kerasfrac.evaluation.metrics import threshold_for, threshold_metrics

    try:
        cal = calibration.fit(val.labels, val.probs, seed=opts.seed)
        why = None
    except ValueError as err:
        cal, why = calibration.Calibrator("none", n=int(val.labels.size)), str(err)
    cal = cal.with_prevalence(opts.prevalence)
    points = {}
    for target, values in (("sensitivity", opts.sensitivity), ("specificity", opts.specificity)):
        for value in values:
            t = threshold_for(val.labels, val.probs, target, value)
            if t is None:
                continue
            m = threshold_metrics(val.labels, val.probs, t)
            points[f"{target}_{value:.2f}"] = {
                "target": target,
                "value": value,
                "threshold": t,  # on the model's probability (predict compares it with that)
                "threshold_calibrated": float(cal.apply(t)),
                "val": {k: m[k] for k in ("sensitivity", "specificity", "precision", "npv")},
            }
    return {
        "chosen_on": "val",
        "n_val": int(val.labels.size),
        "calibrator": cal.to_dict(),
        "not_fitted": why,
        "operating_points": points,
    }


def apply_chosen(chosen: dict, pred: Predictions, split: str, opts: EvaluateOptions) -> dict:
    """``calibration`` (ECE with CI, Brier, log-loss and the reliability bins before and
    after the val calibrator) and ``operating_points`` (sensitivity, specificity, PPV and NPV
    with CIs at each threshold chosen on val) of ``split``'s predictions."""
    from kerasfrac.evaluation import calibration
    from kerasfrac.evaluation.metrics import bootstrap_ci, threshold_metrics

    cal = calibration.Calibrator.from_dict(chosen["calibrator"])
    kw = {"groups": pred.groups, "n_bootstrap": opts.n_bootstrap, "seed": opts.seed}
    block = {
        "calibrator": chosen["calibrator"],
        "before": calibration.calibration_metrics(pred.labels, pred.probs, **kw),
        "after": calibration.calibration_metrics(pred.labels, cal.apply(pred.probs), **kw),
    }
    if chosen.get("not_fitted"):
        block["not_fitted"] = chosen["not_fitted"]
    if split == "val":
        block["note"] = "fitted on this split: 'after' is optimistic here; read it on test"
    points = {}
    for name, point in chosen["operating_points"].items():
        t = point["threshold"]
        m = threshold_metrics(pred.labels, pred.probs, t)
        row = {
            **{k: point[k] for k in ("target", "value", "threshold", "threshold_calibrated")},
            "chosen_on": "val" if split != "val" else "val (the same split: optimistic)",
            "sensitivity": m["sensitivity"],
            "specificity": m["specificity"],
            "ppv": m["precision"],
            "npv": m["npv"],
            "confusion_matrix": m["confusion_matrix"],
        }
        if opts.n_bootstrap:
            ci = bootstrap_ci(
                pred.labels, pred.probs, t, opts.n_bootstrap, opts.seed, groups=pred.groups
            )
            row["ci95"] = {k: ci[k] for k in ("sensitivity", "specificity", "ppv", "npv")}
        points[name] = row
    return {"calibration": block, "operating_points": points}


def write_run_plots(run_dir: Path, split: str, labels, probs, m: dict, groups=None) -> list[Path]:
    """All plots of one evaluation into run_dir/plots, also logged to the run's TensorBoard;
    every title names the run and the split."""
    run_dir = Path(run_dir)
    out = run_dir / runs.PLOTS
    name = f"{runs.run_name(run_dir)}, {split} split (n={m['n']})"
    paths = [
        plots.roc_plot(out / f"{split}_roc.png", labels, probs, m, name, groups=groups),
        plots.pr_plot(out / f"{split}_pr.png", labels, probs, m, name),
        plots.confusion_plot(out / f"{split}_confusion.png", m, name),
    ]
    if m.get("calibration"):
        paths.append(
            plots.reliability_plot(out / f"{split}_reliability.png", m["calibration"], name)
        )
    curves = out / "training_curves.png"
    hist = plots.history_plot(curves, runs.read_history(run_dir), runs.run_name(run_dir))
    if hist is not None:
        paths.append(hist)
    runs.log_images(run_dir, "evaluation", paths)
    return paths


def baseline_comparison(
    build,
    split: str,
    ids,
    labels,
    probs,
    *,
    groups=None,
    n_bootstrap: int = EvaluateOptions.n_bootstrap,
    seed: int = EvaluateOptions.seed,
) -> dict:
    """The model beside the no-anatomy baseline (``kerasfrac.evaluation.audit``), same images.

    ``{"model_auroc", "baseline_auroc" (each with ci95), "difference" with a paired bootstrap
    ci95 (groups resampled where the split holds them), "beats_baseline", "sentence",
    "without_metadata" (the baseline without the dataset's metadata columns), "subgroups"
    ({"region=hand", ..., "frontal=1", ..., "hardware=0", "size=small|medium|large": the same
    AUROCs and paired differences inside each}), "within_region" (the same, pooled within body
    region: ``metrics.stratified_auroc``; None without region flags)}``, or
    ``{"unavailable": reason}`` where the baseline cannot be fitted.
    """
    from kerasfrac.evaluation import audit

    try:
        base = audit.baseline_probabilities(build, split, seed=seed)
    except ValueError as err:
        return {"unavailable": str(err)}
    order = {i: k for k, i in enumerate(base["ids"])}
    missing = [i for i in ids if i not in order]
    if missing:
        return {"unavailable": f"{len(missing)} images (e.g. {missing[0]!r}) not in the build"}
    pick = np.array([order[i] for i in ids])
    b = base["probs"][pick]
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=np.float64)
    n = max(n_bootstrap, 1)
    w = None if base["probs_without_metadata"] is None else base["probs_without_metadata"][pick]
    scorers = {"baseline": b, "without_metadata": w}
    compare = _Comparison(labels, probs, scorers, groups, n, seed)
    overall = compare.row(np.ones(labels.size, bool))
    beats, sentence = _verdict(overall["difference"])
    without = None
    if w is not None:
        without = {
            "baseline_auroc": overall["without_metadata"],
            "difference": overall["difference_without_metadata"],
        }
    meta = {c: v[pick] for c, v in base["meta"].items()}
    regions = body_region(meta)
    return {
        "features": "size, file bytes and JPEG flags, thumbnail intensity statistics, metadata "
        "columns (kerasfrac audit); fitted on train",
        "model_auroc": overall["model"],
        "baseline_auroc": overall["baseline"],
        "difference": overall["difference"],
        "beats_baseline": beats,
        "sentence": sentence,
        "without_metadata": without,
        "subgroups": _subgroups(compare, base["height"][pick], base["width"][pick], meta),
        "within_region": None if regions is None else _within_region(compare, regions),
    }


class _Comparison:
    """The model and the baselines on one split's images: AUROC with CIs of each and the
    model-minus-baseline paired differences, on any subset (``row(mask)``)."""

    def __init__(self, labels, probs, scorers: dict, groups, n: int, seed: int):
        self.labels, self.probs, self.n, self.seed = labels, probs, n, seed
        self.scorers = {k: v for k, v in scorers.items() if v is not None}
        self.groups = None if groups is None else np.asarray(groups, dtype=object)

    def row(self, mask: np.ndarray, strata=None) -> dict:
        from kerasfrac.evaluation.metrics import auroc_ci, paired_auroc_difference

        g = None if self.groups is None else list(self.groups[mask])
        y = self.labels[mask]
        kw = dict(groups=g, n_resamples=self.n, seed=self.seed)
        if strata is not None:
            kw["strata"] = np.asarray(strata)[mask]
        row = {"model": auroc_ci(y, self.probs[mask], **kw)}
        for name, scores in self.scorers.items():
            row[name] = auroc_ci(y, scores[mask], **kw)
            key = "difference" if name == "baseline" else f"difference_{name}"
            row[key] = paired_auroc_difference(y, self.probs[mask], scores[mask], **kw)
        return row


def _subgroups(compare: _Comparison, height, width, meta: dict) -> dict:
    """The model beside the baselines inside each body region, view and image-size band, and
    on images without hardware (where the build records them): AUROCs with CIs and the
    model's paired lead over each baseline."""
    from kerasfrac.evaluation.metrics import size_band

    masks = {}
    regions = body_region(meta)
    if regions is not None:
        order = [*REGION_ORDER, *sorted(set(regions) - set(REGION_ORDER))]
        masks.update({f"region={r}": regions == r for r in order if np.any(regions == r)})
    for view in VIEW_COLUMNS:
        if view in meta and np.any(meta[view] >= 0):
            masks[f"{view}=1"] = meta[view] == 1
    if "hardware" in meta and np.any(meta["hardware"] >= 0):
        masks["hardware=0"] = meta["hardware"] == 0
    bands = size_band(height, width)
    masks.update({f"size={band}": bands == band for band in ("small", "medium", "large")})
    subgroups = {}
    labels = compare.labels
    for name, mask in masks.items():
        if not mask.any():
            continue
        y = labels[mask]
        row = {"n": int(mask.sum()), "fractured": int(y.sum())}
        if min(int(y.sum()), int((y == 0).sum())) < MIN_PER_CLASS_FOR_CI:
            row["note"] = f"fewer than {MIN_PER_CLASS_FOR_CI} images of a class: no AUROC reported"
        else:
            row.update(compare.row(mask))
        subgroups[name] = row
    return subgroups


def _within_region(compare: _Comparison, regions: np.ndarray) -> dict:
    """AUROC within body region, pooled (``metrics.stratified_auroc``: only pairs of a
    fractured and a normal image of the same region count) for the model and the baselines:
    what remains when knowing the region, which the metadata baseline is told, is worth
    nothing."""
    names, counts = np.unique(regions, return_counts=True)
    row = compare.row(np.ones(regions.size, bool), strata=regions)
    y = compare.labels
    return {
        "regions": {
            str(r): {"n": int(c), "fractured": int(y[regions == r].sum())}
            for r, c in zip(names, counts)
        },
        **row,
    }


def _verdict(diff: dict) -> tuple[bool, str]:
    """``(beats_baseline, sentence)`` of a paired AUROC difference: beaten only where its
    CI's lower end is above 0."""
    lo = (diff["ci95"] or [None, None])[0]
    beats = lo is not None and lo > 0
    if diff["difference"] is None:
        return beats, "AUROC undefined on this split (one class): no comparison."
    if beats:
        return beats, (
            f"The model beats a model that never sees a bone by {diff['difference']:+.3f} "
            f"[{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}] AUROC."
        )
    ci = diff["ci95"]
    shown = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    return beats, (
        f"The model does NOT clearly beat a model that never sees a bone: AUROC difference "
        f"{diff['difference']:+.3f}{shown}, an interval that reaches 0 or below."
    )


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _lead(d: dict | None) -> str:
    if not d:
        return "n/a"
    ci = d.get("ci95")
    return _signed(d["difference"]) + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "")


def _comparison_text(g: dict, auc) -> str:
    """One subgroup's (or the within-region) model and baselines, and the model's leads."""
    text = (
        f"model AUROC {auc(g['model'])}, baseline {auc(g['baseline'])}, "
        f"lead {_lead(g['difference'])}"
    )
    if "without_metadata" in g:
        text += (
            f"; without metadata {auc(g['without_metadata'])}, "
            f"lead {_lead(g['difference_without_metadata'])}"
        )
    return text


def baseline_lines(m: dict) -> list[str]:
    """Summary lines of ``no_anatomy_baseline`` (none where absent)."""
    c = m.get("no_anatomy_baseline")
    if not c:
        return []
    if "unavailable" in c:
        return [f"  no-anatomy baseline: unavailable ({c['unavailable']})"]

    def auc(d: dict) -> str:
        ci = d.get("ci95")
        return _num(d.get("auroc")) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    lines = [
        f"  no-anatomy baseline AUROC {auc(c['baseline_auroc'])} vs model {auc(c['model_auroc'])}"
        f" (same images; CIs resample {c['difference']['resampled']})",
        f"  {c['sentence']}",
    ]
    w = c.get("without_metadata")
    if w:
        d = w["difference"]
        shown = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d.get("ci95") else ""
        lines.append(
            f"  the baseline without the metadata columns (image and file statistics only): "
            f"AUROC {auc(w['baseline_auroc'])}; the model's lead over it "
            f"{_signed(d['difference'])}{shown}"
        )
    within = c.get("within_region")
    if within:
        regions = ", ".join(f"{r} {v['n']}" for r, v in within["regions"].items())
        lines.append(
            f"  within body region (pairs of one region only; {regions}): "
            + _comparison_text(within, auc)
        )
    for name, g in c["subgroups"].items():
        if "model" not in g:
            lines.append(f"  subgroup {name}: n {g['n']} ({g['fractured']} fractured): {g['note']}")
            continue
        lines.append(
            f"  subgroup {name}: n {g['n']} ({g['fractured']} fractured), "
            + _comparison_text(g, auc)
        )
    share = c["difference"].get("undefined_share")
    if share:
        lines.append(f"  ({100 * share:.1f}% of resamples left the difference undefined)")
    return lines


# --------------------------------------------------------------------------- summary


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(ci: dict | None, key: str, pct: bool) -> str:
    if not ci or not ci.get(key):
        return ""
    lo, hi = ci[key]
    f = _pct if pct else _num
    return f" [{f(lo)}, {f(hi)}]"


def calibration_lines(m: dict) -> list[str]:
    """The calibration and operating-point lines of ``summary``."""
    lines = []
    c = m.get("calibration")
    if c:
        b, a = c["before"], c["after"]

        def ece(d: dict) -> str:
            ci = d.get("ece_ci95")
            return f"{d['ece']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

        lines.append(
            f"  calibration: ECE ({b['n_bins']} equal-mass bins) {ece(b)}, Brier {b['brier']:.4f}"
            f" -> {ece(a)}, Brier {a['brier']:.4f} after {c['calibrator']['description']}"
        )
        if c.get("note"):
            lines.append(f"    ({c['note']})")
    for name, p in (m.get("operating_points") or {}).items():
        lines.append(
            f"  operating point {name} (threshold {p['threshold']:.4f}, chosen on "
            f"{p['chosen_on']}): {operating_point_text(p)}"
        )
    return lines


def operating_point_text(p: dict) -> str:
    """Sensitivity, specificity, PPV and NPV of one operating point, each with its CI."""
    ci = p.get("ci95")
    return ", ".join(
        f"{label} {_pct(p[key])}{_ci(ci, key, True)}"
        for label, key in (
            ("sensitivity", "sensitivity"),
            ("specificity", "specificity"),
            ("PPV", "ppv"),
            ("NPV", "npv"),
        )
    )


def study_lines(m: dict) -> list[str]:
    """The study-level lines of ``summary`` (none where the build records no studies)."""
    s = m.get("study_level")
    if not s:
        return []
    if "unavailable" in s:
        return [f"  study level: unavailable ({s['unavailable']})"]
    a, c = s["auroc"], s["counts"]
    lines = [
        f"  study level: {s['n_studies']} studies ({c['fractured']} fractured, {c['normal']} "
        f"normal) of {s['n_images']} images: AUROC {_num(a['auroc'])}"
        f"{_ci(a, 'ci95', False)} (CI resamples {s['n_groups']} "
        f"{s['resampling_unit'].split(':')[0]})",
    ]
    at = s["at_val_threshold"]
    if "undefined" in at:
        lines.append(f"    no study threshold: {at['undefined']}")
    else:
        ci = at.get("ci95")
        lines.append(
            f"    at {at['threshold']:.3f} (Youden J, chosen on {at['chosen_on']}): sensitivity "
            f"{_pct(at['sensitivity'])}{_ci(ci, 'sensitivity', True)}, specificity "
            f"{_pct(at['specificity'])}{_ci(ci, 'specificity', True)}, Cohen's kappa "
            f"{_num(at['kappa'])}{_ci(ci, 'kappa', False)}"
        )
    lines.append(f"    ({s['rule']})")
    if s["mixed_label_studies"]:
        lines.append(
            f"    {s['mixed_label_studies']} studies hold images of both labels (e.g. "
            f"{s['examples_of_mixed_label_studies'][0]}): labelled fractured"
        )
    if s["images_without_study"]:
        lines.append(f"    {s['images_without_study']} images have no study: left out")
    return lines


def summary(m: dict) -> str:
    """A readable multi-line summary of a metrics dict."""
    c = m["counts"]
    ci = m.get("ci95")
    lines = [
        f"split {m.get('split', '?')}: {m['n']} images ({c['fractured']} fractured, "
        f"{c['normal']} normal)",
        *([f"  split given: {m['split_given']['note']}"] if m.get("split_given") else []),
        f"  majority baseline (always '{m.get('majority_class', 'normal')}'): "
        f"accuracy {_pct(m['majority_baseline_accuracy'])}",
        f"  AUROC {_num(m['auroc'])}{_ci(ci, 'auroc', False)}   "
        f"average precision {_num(m.get('average_precision'))}   sensitivity at 90% "
        f"specificity {_pct(m.get('sensitivity_at_90_specificity'))}   loss {m['loss']:.4f}",
    ]

    def point(name: str, d: dict, ci) -> str:
        tn, fp = d["confusion_matrix"][0]
        fn, tp = d["confusion_matrix"][1]
        return (
            f"  at {name} {d['threshold']:.3f}: accuracy {_pct(d['accuracy'])}"
            f"{_ci(ci, 'accuracy', True)}, sensitivity {_pct(d['sensitivity'])}"
            f"{_ci(ci, 'sensitivity', True)}, specificity {_pct(d['specificity'])}"
            f"{_ci(ci, 'specificity', True)}, balanced accuracy {_pct(d['balanced_accuracy'])}, "
            f"F1 {_num(d['f1'])}; TN {tn} FP {fp} FN {fn} TP {tp}"
        )

    lines.append(point("threshold", m, ci))
    if m.get("youden"):
        y = m["youden"]
        lines.append(point(f"Youden-J threshold (chosen on {y['chosen_on']})", y, y.get("ci95")))
    acc, base = m["accuracy"], m["majority_baseline_accuracy"]
    verdict = "BELOW" if acc < base else "not above" if acc == base else "above"
    lines.append(
        f"  accuracy at 0.5 is {verdict} the majority baseline ({_pct(acc)} vs {_pct(base)})"
    )
    if ci:
        lines.append(
            f"  (95% CI, {resampling(ci)}: percentile bootstrap, {ci['n_resamples']} "
            f"resamples, seed {ci['seed']})"
        )
    lines += calibration_lines(m)
    for name, g in (m.get("subgroups") or {}).items():
        if "counts" in g:
            lines.append(
                f"  subgroup {name}: n {g['n']} ({g['counts']['fractured']} fractured), "
                f"accuracy {_pct(g['accuracy'])}, AUROC {_num(g['auroc'])}"
            )
        else:
            lines.append(f"  subgroup {name}: n {g['n']}")
    lines += baseline_lines(m)
    lines += study_lines(m)
    if m.get("note"):
        lines.append(f"  note: {m['note']}")
    shares = (ci or {}).get("undefined_share") or {}
    undefined = {k: v for k, v in shares.items() if v}
    if undefined:
        lines.append(f"  bootstrap resamples where a metric was undefined: {undefined}")
    for name, why in (m.get("undefined") or {}).items():
        lines.append(f"  undefined: {name} ({why})")
    for p in m.get("plots", []):
        lines.append(f"  plot: {p}")
    return "\n".join(lines)
