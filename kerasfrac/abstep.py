"""A/B of training-step variants in one process, repeats interleaved (issue 39's levers).

    python -m kerasfrac.abstep --config configs/fracatlas_best.yaml \\
        --set data.dir=BUILD --variants fast,bn-f32-data --steps 3 --repeats 5

Each variant builds its own model and ``train.make_train_step`` step of the config (on an
in-memory batch, as ``kerasfrac bench --what train``); after warm-up, round r times
``steps`` steps of every variant, the order rotating each round, so a machine shared with
other jobs loads every variant alike. Prints a JSON line: per variant the median images/s,
min, max, ratio to the first variant, and the load average seen (before / after). With
``--profile N``, each variant's op-kind profile (``stepprofile``) of N steps follows.

Thread settings must be made before TensorFlow runs anything, so ``--threads`` compares
them across processes instead: ``--threads 0,0/2,1`` runs one process per setting
(``intra,inter`` op threads; 0 is TensorFlow's default), one repeat each, the order rotating
each round, ``--repeats`` rounds.

Variants (in-process switches):
``fast`` (the config as it is), ``bn-f32-data`` (``FusedBatchNormalization`` on a float32
copy of 16-bit activations, the previous fast path),
``plain`` (Keras' BatchNormalization, as ``train.fast: false`` builds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

VARIANTS = ("fast", "bn-f32-data", "plain")


def build_variant(cfg, variant: str):
    """``(model, step)`` of ``cfg`` with ``variant``'s switch."""
    import keras
    import tensorflow as tf

    from kerasfrac import data
    from kerasfrac.models import build_model
    from kerasfrac.models.layers import FusedBatchNormalization
    from kerasfrac.training import train

    if variant not in VARIANTS:
        raise ValueError(f"abstep: unknown variant {variant!r}; expected one of {VARIANTS}")
    keras.mixed_precision.set_global_policy(cfg.train.precision)
    model_cfg = dataclasses.replace(cfg.model, sync_batchnorm=False)
    fused = cfg.train.fast and variant != "plain"
    model = build_model(model_cfg, data.image_shape(cfg.data), fused_batchnorm=fused)
    if variant == "bn-f32-data":
        for layer in model.layers:
            if isinstance(layer, FusedBatchNormalization):
                layer.half_data = False
    model.compile(optimizer=train.make_optimizer(cfg, model), loss="binary_crossentropy")
    weights = (1.0, 1.0) if cfg.train.class_weight != "none" else None
    step = train.make_train_step(
        model,
        tf.distribute.get_strategy(),
        cfg.train.batch_size,
        weights=weights,
        **train.step_options(cfg.train),
        **train.loss_options(cfg.train),
    )
    return model, step


def fit_iterator(cfg):
    """The training pipeline of ``cfg`` (``bench.training_stream``, as ``kerasfrac train``
    and ``bench --what fit`` read it), its cache filled: one epoch read first, without the
    model."""
    from kerasfrac.bench import training_stream

    it, epoch_steps = training_stream(cfg)
    for _ in range(epoch_steps or 1):
        next(it)
    return it


def run(cfg, variants, steps: int, repeats: int, profile: int = 0, fit: bool = False) -> dict:
    """With ``fit``, each variant is also timed on the training pipeline (one shared
    iterator, cache filled first): ``"<variant> fit"`` beside the in-memory step. The
    process's dtype policy is what it was before, afterwards (the variants set the
    config's precision)."""
    import keras

    policy = keras.mixed_precision.dtype_policy()
    try:
        return _run(cfg, variants, steps, repeats, profile, fit)
    finally:
        keras.mixed_precision.set_dtype_policy(policy)


def _run(cfg, variants, steps: int, repeats: int, profile: int, fit: bool) -> dict:
    import tensorflow as tf

    from kerasfrac import bench, stepprofile

    batch = bench.synthetic_batch(cfg)
    flag = tf.constant(0, tf.int32)
    built = {}
    for v in variants:
        model, step = build_variant(cfg, v)
        it = iter(tf.data.Dataset.from_tensors(batch).repeat())
        for _ in range(3):  # trace + warm-up
            step(it, flag)
        built[v] = (model, step, it)
    if fit:
        shared = fit_iterator(cfg)
        for v in list(variants):
            model, step, _ = built[v]
            for _ in range(2):  # the pipeline's dict may trace the step again
                step(shared, flag)
            built[f"{v} fit"] = (model, step, shared)
        variants = [*variants, *(f"{v} fit" for v in variants)]
    rates = {v: [] for v in variants}
    loads = [os.getloadavg()[0]]
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            _, step, it = built[v]
            start, seen = time.perf_counter(), 0
            for _ in range(steps):
                out = step(it, flag)
                seen += int(out[2].shape[0])
            out[0].numpy()
            rates[v].append(seen / (time.perf_counter() - start))
        loads.append(os.getloadavg()[0])
    base = statistics.median(rates[variants[0]])
    result = {
        "config": {
            "image_size": cfg.data.image_size,
            "batch_size": cfg.train.batch_size,
            "precision": cfg.train.precision,
            "fast": cfg.train.fast,
        },
        "steps": steps,
        "repeats": repeats,
        "load_average_1min": {"min": min(loads), "max": max(loads), "seen": loads},
        "variants": {
            v: {
                **bench._spread(rates[v]),
                "ratio": statistics.median(rates[v]) / base,
                "rates": rates[v],
            }
            for v in variants
        },
    }
    if profile:
        for v in [v for v in variants if not v.endswith(" fit")]:
            model, step, it = built[v]
            prof = stepprofile.profile_step(step, it, flag, profile, model.optimizer.name)
            result["variants"][v]["profile"] = {**prof, "setting": v}
    return result


def set_threads(setting: str) -> None:
    """``intra,inter`` (0: TensorFlow's default) before TensorFlow runs anything."""
    import tensorflow as tf

    intra, inter = (int(n) for n in setting.split(","))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)


def run_threads(argv_base: list[str], settings: list[str], repeats: int) -> dict:
    """One process per thread setting and round (a repeat each), the order rotating."""
    import subprocess
    import sys
    import tempfile

    rates = {s: [] for s in settings}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="kerasfrac-abstep-") as tmp:
        for r in range(repeats):
            for s in settings[r % len(settings) :] + settings[: r % len(settings)]:
                out = os.path.join(tmp, "out.json")
                cmd = [sys.executable, "-m", "kerasfrac.abstep", *argv_base]
                cmd += ["--variants", "fast", "--repeats", "1", "--thread-setting", s]
                proc = subprocess.run([*cmd, "--json", out], capture_output=True, text=True)
                if proc.returncode:
                    raise RuntimeError(
                        f"abstep --thread-setting {s} failed:\n{proc.stderr[-3000:]}"
                    )
                with open(out) as f:
                    rates[s] += json.load(f)["variants"]["fast"]["rates"]
                loads.append(os.getloadavg()[0])
    base = statistics.median(rates[settings[0]])
    from kerasfrac import bench

    return {
        "load_average_1min": {"min": min(loads), "max": max(loads), "seen": loads},
        "threads": {
            s: {**bench._spread(v), "ratio": statistics.median(v) / base, "rates": v}
            for s, v in rates.items()
        },
    }


def main(argv=None) -> int:
    from kerasfrac import config, stepprofile
    from kerasfrac.training import kernels

    p = argparse.ArgumentParser(prog="python -m kerasfrac.abstep", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--variants", default="fast,bn-f32-data")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("--fit", action="store_true", help="also time each on the input pipeline")
    p.add_argument("--threads", help="intra,inter/intra,inter/...: one process each")
    p.add_argument("--thread-setting", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        base = ["--config", a.config, "--steps", str(a.steps)]
        base += [x for o in a.overrides for x in ("--set", o)]
        result = run_threads(base, a.threads.split("/"), a.repeats)
        for s, f in result["threads"].items():
            print(
                f"threads intra,inter={s}: {f['images_per_second']:.1f} img/s (min "
                f"{f['min']:.1f}, max {f['max']:.1f}), {f['ratio']:.2f}x"
            )
        return _finish(result, a.json)
    if a.thread_setting:
        set_threads(a.thread_setting)
    cfg = config.load_config(a.config, a.overrides)
    print(f"CPU kernels: {kernels.request_onednn(cfg.train.fast)}", flush=True)
    precision = kernels.resolve_precision(cfg.train.precision)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    result = run(cfg, a.variants.split(","), a.steps, a.repeats, a.profile, a.fit)
    for v, f in result["variants"].items():
        print(
            f"{v}: {f['images_per_second']:.1f} img/s (min {f['min']:.1f}, max {f['max']:.1f}),"
            f" {f['ratio']:.2f}x"
        )
        if "profile" in f:
            print(stepprofile.format_table(f["profile"]))
    return _finish(result, a.json)


def _finish(result: dict, json_path: str | None) -> int:
    """Print the load seen during the repeats; write ``result`` to ``json_path`` if given."""
    load = result["load_average_1min"]
    print(f"load average (1 min) during the repeats: {load['min']:.1f} - {load['max']:.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
