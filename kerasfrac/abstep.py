"""A/B of training-step variants in one process, repeats interleaved (issue 39's levers).

    python -m kerasfrac.abstep --config configs/fracatlas_best.yaml \\
        --set data.dir=BUILD --variants fast,bn-f32-data --steps 3 --repeats 5

Each variant builds its own model and ``train.make_train_step`` step of the config (on an
in-memory batch, as ``kerasfrac bench --what train``); after warm-up, round r times
``steps`` steps of every variant, the order rotating each round, so a machine shared with
other jobs loads every variant alike. Prints a JSON line: per variant the median images/s,
min, max, ratio to the first variant, and the load average seen (before / after). With
``--profile N``, each variant's op-kind profile (``stepprofile``) of N steps follows.

Variants (in-process switches; thread settings need a process each, see docs/speed.md):
``fast`` (the config as it is), ``bn-f32-data`` (``FusedBatchNormalization`` on a float32
copy of 16-bit activations, the previous fast path), ``xla`` (``jit_compile``),
``plain`` (Keras' BatchNormalization, as ``train.fast: false`` builds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

VARIANTS = ("fast", "bn-f32-data", "xla", "plain")


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
        jit_compile=variant == "xla",
        **train.step_options(cfg.train),
        **train.loss_options(cfg.train),
    )
    return model, step


def run(cfg, variants, steps: int, repeats: int, profile: int = 0) -> dict:
    import tensorflow as tf

    from kerasfrac import bench, stepprofile

    batch = bench.synthetic_batch(cfg)
    images = int(batch["image"].shape[0])
    flag = tf.constant(0, tf.int32)
    built = {}
    for v in variants:
        model, step = build_variant(cfg, v)
        it = iter(tf.data.Dataset.from_tensors(batch).repeat())
        for _ in range(3):  # trace + warm-up
            step(it, flag)
        built[v] = (model, step, it)
    rates = {v: [] for v in variants}
    loads = [os.getloadavg()[0]]
    for r in range(repeats):
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for v in order:
            _, step, it = built[v]
            start = time.perf_counter()
            for _ in range(steps):
                out = step(it, flag)
            out[0].numpy()
            rates[v].append(steps * images / (time.perf_counter() - start))
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
        for v in variants:
            model, step, it = built[v]
            prof = stepprofile.profile_step(step, it, flag, profile, model.optimizer.name)
            result["variants"][v]["profile"] = {**prof, "setting": v}
    return result


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
    a = p.parse_args(argv)
    cfg = config.load_config(a.config, a.overrides)
    print(f"CPU kernels: {kernels.request_onednn(cfg.train.fast)}", flush=True)
    precision = kernels.resolve_precision(cfg.train.precision)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    result = run(cfg, a.variants.split(","), a.steps, a.repeats, a.profile)
    for v, f in result["variants"].items():
        print(
            f"{v}: {f['images_per_second']:.1f} img/s (min {f['min']:.1f}, max {f['max']:.1f}),"
            f" {f['ratio']:.2f}x"
        )
        if "profile" in f:
            print(stepprofile.format_table(f["profile"]))
    load = result["load_average_1min"]
    print(f"load average (1 min) during the repeats: {load['min']:.1f} - {load['max']:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
