"""Evaluation plots as PNG files (matplotlib, Agg backend): they draw what they are given
(``evaluate.write_run_plots`` names the files, titles them after the run and logs them).

ROC (with a 95% bootstrap band) and precision-recall curves with the operating points
(threshold 0.5 and the Youden-J threshold chosen on val) marked, the confusion matrix, and
the training curves of history.csv. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from kerasfrac.evaluation.metrics import roc_band  # noqa: E402


def _save(fig, path: Path) -> Path:
    from kerasfrac.runs import save_figure

    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _points(m: dict) -> list[tuple[str, dict]]:
    pts = [(f"threshold {m['threshold']:.2f}", m)]
    if m.get("youden"):
        pts.append((f"Youden-J {m['youden']['threshold']:.3f} (val)", m["youden"]))
    return pts


def _title(what: str, name: str) -> str:
    """``what``, and the run and split the figure is of (``name``) on a second line."""
    return f"{what}\n{name}" if name else what


def roc_plot(path: Path, labels, probs, m: dict, name: str = "", groups=None) -> Path:
    """The ROC curve with a pointwise 95% bootstrap band (``metrics.roc_band``, with the
    resamples and seed of ``m``'s CIs; groups resampled where ``groups`` has any)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    if m.get("auroc") is not None:
        fpr, tpr, _ = skm.roc_curve(labels, probs)
        ci = (m.get("ci95") or {}).get("auroc")
        shown = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        ax.plot(fpr, tpr, label=f"ROC (AUROC {m['auroc']:.3f}{shown})")
        boot = m.get("ci95") or {}
        band = roc_band(
            labels,
            probs,
            groups=groups,
            n_resamples=boot.get("n_resamples", 1000),
            seed=boot.get("seed", 0),
        )
        ax.fill_between(
            band["fpr"],
            band["low"],
            band["high"],
            step="post",
            alpha=0.25,
            label="95% CI (bootstrap)",
        )
    else:
        ax.text(0.5, 0.5, "AUROC undefined: one class", ha="center")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    for (point, d), marker in zip(_points(m), "os"):
        if d["sensitivity"] is not None and d["specificity"] is not None:
            ax.plot(1 - d["specificity"], d["sensitivity"], marker, ms=8, label=point)
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title=_title("ROC", name),
    )
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def pr_plot(path: Path, labels, probs, m: dict, name: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    prevalence = m["counts"]["fractured"] / m["n"]
    if m.get("average_precision") is not None:
        precision, recall, _ = skm.precision_recall_curve(labels, probs)
        ax.plot(recall, precision, label=f"PR (AP {m['average_precision']:.3f})")
    ax.axhline(prevalence, ls="--", color="grey", label=f"prevalence {prevalence:.2f}")
    for (point, d), marker in zip(_points(m), "os"):
        if d["sensitivity"] is not None and d["precision"] is not None:
            ax.plot(d["sensitivity"], d["precision"], marker, ms=8, label=point)
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title=_title("Precision-recall", name),
    )
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def reliability_plot(path: Path, calibration: dict, name: str = "") -> Path:
    """The reliability diagram before and after the val calibrator (``m["calibration"]``):
    per equal-mass bin the observed share of fractured images against the mean predicted
    probability, each point labelled with its bin's image count; the diagonal is perfect."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    described = calibration["calibrator"]["description"].split(" (")[0]
    for key, label, marker in (("before", "model", "o-"), ("after", described, "s-")):
        d = calibration[key]
        bins = d["reliability"]
        x = [b["p_mean"] for b in bins]
        y = [b["observed"] for b in bins]
        ax.plot(x, y, marker, ms=5, label=f"{label}: ECE {d['ece']:.3f}, Brier {d['brier']:.3f}")
        if key == "before":
            for b in bins:
                ax.annotate(
                    f"n={b['n']}",
                    (b["p_mean"], b["observed"]),
                    fontsize=6,
                    xytext=(3, -9),
                    textcoords="offset points",
                )
    ax.set(
        xlabel="mean predicted probability of 'fractured' (bin)",
        ylabel="observed share fractured (bin)",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title=_title(f"Reliability ({calibration['before']['n_bins']} equal-mass bins)", name),
    )
    ax.legend(loc="upper left", fontsize=7)
    return _save(fig, path)


def confusion_plot(path: Path, m: dict, name: str = "") -> Path:
    cm = np.array(m["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(4, 4))
    shown = ax.imshow(cm, cmap="Blues")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="images")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if v > cm.max() / 2 else "black",
        )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["normal", "fractured"],
        yticklabels=["normal", "fractured"],
        xlabel="predicted",
        ylabel="true",
        title=_title(f"Confusion matrix at {m['threshold']:.2f}", name),
    )
    return _save(fig, path)


def history_plot(path: Path, rows: list[dict[str, float]], name: str = "") -> Path | None:
    """Loss, accuracy and AUROC per epoch (train and val) of history.csv's ``rows``
    (``runs.read_history``); None without any."""
    if not rows:
        return None
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r.get("epoch", k + 1)) for k, r in enumerate(rows)]  # from 1
    keys = [k for k in ("loss", "accuracy", "auroc") if k in rows[0]]
    # constrained layout keeps the figure title above the panels' titles and each y label
    # clear of its neighbour's tick labels
    fig, axes = plt.subplots(
        1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False, layout="constrained"
    )
    for ax, key in zip(axes[0], keys):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs only
        for prefix, label in (("", "train"), ("val_", "val")):
            if prefix + key in rows[0]:
                ax.plot(epochs, [r.get(prefix + key, np.nan) for r in rows], "o-", label=label)
        ax.set(xlabel="epoch", ylabel=key, title=key)
        ax.legend(fontsize=8)
    if name:
        fig.suptitle(f"Training curves: {name}", fontsize=10)
    return _save(fig, path)


def roc_overlay_png(curves: list[tuple[str, object, object]], title: str = "") -> bytes:
    """One figure with the test ROC curve of each run (``(name, labels, probabilities)``),
    AUROC in the legend; the PNG's bytes (``kerasfrac report --html`` embeds them)."""
    import io

    fig, ax = plt.subplots(figsize=(6, 6))
    for name, labels, probs in curves:
        labels = np.asarray(labels)
        if len(np.unique(labels)) < 2:
            continue  # one class: no curve
        fpr, tpr, _ = skm.roc_curve(labels, probs)
        auc = skm.roc_auc_score(labels, probs)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f}, n={labels.size})")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="chance")
    ax.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
        title=title or "ROC, test split",
    )
    ax.legend(loc="lower right", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
