"""`kerasfrac bench`: where the time goes, as images per second after warm-up.

- input: the training pipeline alone (no model): uncached (decode from TFRecords every time)
  and cached (after one epoch filled the cache), with the config's oversampling and flips,
  and as training reads it (``training_stream``: cached, every augmentation, the heads'
  targets) with its CPU time per image, what it takes from the step on a shared CPU;
  then kerasfrac's uncached pipeline in evaluation order (``make_eval_dataset``) beside the
  plain keras-io style pipeline a user writes by hand (records -> ``decode_jpeg`` ->
  bilinear resize -> batch) over the same shards of the train split, fresh iterators,
  repeats interleaved, in wall-clock and in CPU time (the ratio that holds on a shared
  machine), and the bytes per image the cache holds;
- train: the training step alone (the same ``train.make_train_step`` the trainer runs) on a
  batch already in memory: plain float32 (Keras' own layers, TensorFlow's default kernels:
  the reference), the config's own setting, and ``train.fast`` with each precision asked;
  each in a fresh process, because oneDNN is chosen when TensorFlow is imported; with
  ``profile`` (``--profile``), each setting also profiles a few more steps and reports the
  milliseconds per op kind (``stepprofile``);
- fit: pipeline and step together, with the config's settings; ``input/train`` (against the
  config's own step) above 1 means the model, not the input pipeline, is the bottleneck; with
  the training images per epoch, the minutes of training steps for ``train.epochs`` epochs
  (validation passes and checkpoints not counted);
- build: the builder on a source folder against the floor of decoding every image once with
  the same number of threads.

Each figure is the median over ``repeats`` with min and max; nothing here asserts a target:
the figures go into a table and a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kerasfrac.options import BenchOptions

# Imports of TensorFlow-based modules are local: each setting runs in its own process, whose
# oneDNN choice must be made before TensorFlow is imported (training.kernels).

WHAT = ("input", "train", "fit", "build")


def _spread(rates: list[float]) -> dict:
    return {
        "images_per_second": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "repeats": len(rates),
    }


def _time_batches(iterator, steps: int, batch_size_of) -> float:
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        images += batch_size_of(next(iterator))
    return images / (time.perf_counter() - start)


def plain_pipeline(build_dir, split: str, data_cfg, batch_size: int):
    """The pipeline a user writes by hand, keras-io style, over the same shards: read the
    records, ``decode_jpeg`` straight to the channels wanted, plain bilinear resize (no
    antialiasing), batch, prefetch. The yardstick for kerasfrac's own input speed."""
    import tensorflow as tf

    from tfrecords_builder import schema
    from tfrecords_builder.reader import shard_files

    spec = {
        schema.ENCODED: tf.io.FixedLenFeature([], tf.string),
        schema.LABEL: tf.io.FixedLenFeature([], tf.int64),
    }
    size, channels = data_cfg.image_size, 1 if data_cfg.grayscale else 3

    def fn(record):
        ex = tf.io.parse_single_example(record, spec)
        image = tf.io.decode_jpeg(ex[schema.ENCODED], channels=channels)
        return tf.image.resize(image, [size, size]) / 255.0, tf.cast(ex[schema.LABEL], tf.float32)

    ds = tf.data.TFRecordDataset(shard_files(build_dir, split))
    return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(-1)


def _iterator_rates(it, steps: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over the next
    ``steps`` batches of ``it``."""
    wall, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(steps):
        batch = next(it)  # kerasfrac's batches are dicts, the plain pipeline's tuples
        images += int((batch["image"] if isinstance(batch, dict) else batch[0]).shape[0])
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def _rates(make_ds, steps: int) -> tuple[float, float]:
    """``_iterator_rates`` of a fresh iterator (startup included, as every epoch of an
    uncached pipeline pays it)."""
    return _iterator_rates(iter(make_ds().repeat()), steps)


def bench_input_vs_plain(cfg, steps: int, repeats: int) -> dict:
    """kerasfrac's uncached pipeline (evaluation order, no augmentation) against
    ``plain_pipeline`` on the train split, repeats interleaved, medians and ratios."""
    from kerasfrac import data

    data_cfg = dataclasses.replace(cfg.data, cache="none")
    batch, build = cfg.train.batch_size, cfg.data.dir
    makers = {
        "plain keras-io": lambda: plain_pipeline(build, "train", data_cfg, batch),
        "kerasfrac": lambda: data.make_eval_dataset(build, "train", data_cfg, batch),
    }
    for make in makers.values():  # trace and warm the page cache
        _rates(make, 2)
    wall = {k: [] for k in makers}
    cpu = {k: [] for k in makers}
    for r in range(repeats):
        for k in list(makers)[r % 2 :] + list(makers)[: r % 2]:  # alternate who goes first
            w, c = _rates(makers[k], steps)
            wall[k].append(w)
            cpu[k].append(c)
    out = {
        k: {**_spread(wall[k]), "images_per_cpu_second": statistics.median(cpu[k])} for k in makers
    }
    out["ratio"] = (
        out["kerasfrac"]["images_per_second"] / out["plain keras-io"]["images_per_second"]
    )
    out["cpu_ratio"] = (
        out["kerasfrac"]["images_per_cpu_second"] / out["plain keras-io"]["images_per_cpu_second"]
    )
    out["images"] = steps * batch
    return out


def bench_input(cfg, steps: int, repeats: int) -> dict:
    from kerasfrac import data

    out = {}
    for label, cache in (("uncached", "none"), ("cached", "memory")):
        _progress(f"input {label}")
        data_cfg = dataclasses.replace(cfg.data, cache=cache)
        ds, epoch_steps = data.make_dataset(
            None,
            "train",
            data_cfg,
            cfg.train.batch_size,
            cfg.train.seed,
            training=True,
            dataset=cfg.dataset,
        )
        it = iter(ds.repeat())
        warm = 2 if cache == "none" else (epoch_steps or steps)  # one epoch fills the cache
        for _ in range(warm):
            next(it)
        rates = [
            _time_batches(it, steps, lambda b: int(b["image"].shape[0])) for _ in range(repeats)
        ]
        out[label] = _spread(rates)
    _progress("input as training reads it")
    it, epoch_steps = training_stream(cfg)
    for _ in range(epoch_steps or steps):  # one epoch fills the cache
        next(it)
    rates, cpu = zip(*(_iterator_rates(it, steps) for _ in range(repeats)), strict=True)
    out["training"] = {**_spread(list(rates)), "images_per_cpu_second": statistics.median(cpu)}
    return out


def _model_and_step(cfg, precision: str):
    import keras
    import tensorflow as tf

    from kerasfrac import data
    from kerasfrac.models import build_model
    from kerasfrac.training import train

    keras.mixed_precision.set_global_policy(precision)
    # One device: no BatchNorm synchronisation, as train.train decides for one replica.
    model_cfg = dataclasses.replace(cfg.model, sync_batchnorm=False)
    model = build_model(model_cfg, data.image_shape(cfg.data), fused_batchnorm=cfg.train.fast)
    model.compile(optimizer=train.make_optimizer(cfg, model), loss="binary_crossentropy")
    strategy = tf.distribute.get_strategy()
    # The config's own loss: label smoothing, class weights (their values cost nothing), and
    # with model.box_head the heat-map loss, fed masks as in training.
    weights = (1.0, 1.0) if cfg.train.class_weight != "none" else None
    step = train.make_train_step(
        model,
        strategy,
        cfg.train.batch_size,
        weights=weights,
        **train.step_options(cfg.train),
        **train.loss_options(cfg.train),
    )
    return model, step


def train_settings(cfg, precisions: list[str]) -> list[tuple[str, bool, str]]:
    """``(label, fast, precision)`` rows: plain float32 (the reference), the config's own
    setting, then ``train.fast`` with each precision asked."""
    rows = [(False, "float32"), (cfg.train.fast, cfg.train.precision)]
    rows += [(True, p) for p in precisions]
    return [(setting_label(fast, p), fast, p) for fast, p in dict.fromkeys(rows)]


def setting_label(fast: bool, precision: str) -> str:
    return f"{'fast' if fast else 'plain'} {precision}"


def synthetic_batch(cfg) -> dict:
    """One in-memory dict batch of ``cfg``'s shape, as ``make_dataset`` gives (random
    images, labels, and masks / metadata where the heads want them)."""
    import numpy as np
    import tensorflow as tf

    from kerasfrac import data
    from tfrecords_builder.defaults import META_TARGETS

    shape = (cfg.train.batch_size, *data.image_shape(cfg.data))
    rng = np.random.default_rng(0)
    batch = {
        "image": tf.constant(rng.random(shape, dtype=np.float32)),
        "label": tf.constant(rng.integers(0, 2, shape[0]).astype(np.float32)),
    }
    if cfg.model.box_head:
        masks = (rng.random((*shape[:3], 1)) > 0.95).astype(np.float32)
        batch["box_mask"], batch["box_weight"] = tf.constant(masks), tf.ones([shape[0]])
    if cfg.model.meta_head:
        meta = rng.integers(0, 2, (shape[0], len(META_TARGETS)))
        batch["meta"] = tf.constant(meta, tf.float32)
    return batch


def measure_train_step(cfg, steps: int, repeats: int, profile: int = 0) -> dict:
    """Images/s of ``cfg``'s training step on one in-memory batch, in this process; with
    ``profile`` > 0, also where ``profile`` more steps spend their time (``stepprofile``)."""
    import keras
    import tensorflow as tf

    from kerasfrac import stepprofile
    from kerasfrac.models import uses_fused_batchnorm
    from kerasfrac.training import kernels

    batch = synthetic_batch(cfg)
    images = int(batch["image"].shape[0])
    try:
        model, step = _model_and_step(cfg, cfg.train.precision)
        it = iter(tf.data.Dataset.from_tensors(batch).repeat())
        flag = tf.constant(0, tf.int32)
        for _ in range(3):  # trace + warm-up
            step(it, flag)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                losses = step(it, flag)[0]
            float(losses.numpy().mean())  # wait for the last step
            rates.append(steps * images / (time.perf_counter() - start))
        prof = None
        if profile:
            prof = stepprofile.profile_step(step, it, flag, profile, model.optimizer.name)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = {
        **_spread(rates),
        "onednn": kernels.onednn_enabled(),
        "fused_batchnorm": uses_fused_batchnorm(model),
    }
    if prof is not None:
        out["profile"] = prof
    return out


def profile_steps(steps: int) -> int:
    """Steps profiled per setting with ``--profile``: ``steps``, 2 to 5."""
    return max(2, min(steps, 5))


def bench_train(
    cfg, steps: int, repeats: int, precisions: list[str], profile: bool = False
) -> dict:
    """Each setting in its own process: oneDNN is chosen when TensorFlow is imported. With
    ``profile``, each setting also profiles ``profile_steps(steps)`` steps after its timed
    ones (``stepprofile``: milliseconds per op kind)."""
    from kerasfrac.training import kernels

    out = {}
    for label, fast, precision in train_settings(cfg, precisions):
        _progress(f"train {label} ({repeats} x {steps} steps in a fresh process)")
        env = dict(os.environ)
        if fast:
            env.setdefault(kernels.ENV, "1")  # as `kerasfrac train` does; the user's value wins
        else:
            env.pop(kernels.ENV, None)  # TensorFlow's own default
        spec = {
            "config": dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, fast=fast, precision=precision)
            ).to_dict(),
            "steps": steps,
            "repeats": repeats,
            "profile": profile_steps(steps) if profile else 0,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "kerasfrac.bench", "--train-step", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"bench: the training-step measurement for {label!r} failed "
                f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        if profile:
            out[label]["profile"]["setting"] = label
    base = out[setting_label(False, "float32")]["images_per_second"]
    for figure in out.values():
        figure["speedup"] = figure["images_per_second"] / base
    return out


def training_stream(cfg):
    """``(iterator, steps per epoch)``: the training pipeline of ``cfg`` as ``kerasfrac train``
    reads it (augmentation, balanced batches, the heads' targets), repeated."""
    from kerasfrac import data

    ds, epoch_steps = data.make_dataset(
        None,
        "train",
        cfg.data,
        cfg.train.batch_size,
        cfg.train.seed,
        training=True,
        dataset=cfg.dataset,
        with_boxes=cfg.model.box_head,
        with_meta=cfg.model.meta_head,
        box_target=cfg.train.box_target,
    )
    return iter(ds.repeat()), epoch_steps


def bench_fit(cfg, steps: int, repeats: int) -> dict:
    import keras
    import tensorflow as tf

    try:
        _, step = _model_and_step(cfg, cfg.train.precision)
        it, epoch_steps = training_stream(cfg)
        flag = tf.constant(0, tf.int32)
        for _ in range(min(epoch_steps or steps, 4 * steps)):  # warm the cache and the trace
            step(it, flag)
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            images = 0
            for _ in range(steps):
                images += int(step(it, flag)[2].shape[0])
            rates.append(images / (time.perf_counter() - start))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = _spread(rates)
    epoch = epoch_images(cfg, epoch_steps)
    out.update(
        epoch_images=epoch,
        epochs=cfg.train.epochs,
        train_minutes=cfg.train.epochs * epoch / out["images_per_second"] / 60,
    )
    return out


def epoch_images(cfg, epoch_steps: int | None) -> int:
    """Training images per epoch as ``kerasfrac train`` runs it: ``train.steps_per_epoch`` or
    the oversampled epoch's steps, in batches; else the whole split (x3 with flip-expand)."""
    from kerasfrac import data

    steps = cfg.train.steps_per_epoch or epoch_steps
    if steps:
        return steps * cfg.train.batch_size
    return data.epoch_images(data.check_build(cfg.data.dir, cfg.dataset), cfg.data)


def decode_floor(files: list[Path], workers: int) -> float:
    """Seconds to read and fully decode every file once with ``workers`` threads."""
    import tensorflow as tf

    def decode(path: Path) -> None:
        try:
            tf.io.decode_image(path.read_bytes(), channels=0, expand_animations=False)
        except tf.errors.InvalidArgumentError:
            pass  # a broken file costs its attempt, as in the builder

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(decode, files))
    return time.perf_counter() - start


def bench_build(dataset: str, source: Path | None, repeats: int, workers: int | None) -> dict:
    from tfrecords_builder import datasets
    from tfrecords_builder.build import BuildOptions, build
    from tfrecords_builder.datasets import synthetic

    workers = workers or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="kerasfrac-bench-") as tmp:
        if source is None:  # a synthetic source of real-X-ray-like size
            dataset, source = "synthetic", Path(tmp) / "raw"
            synthetic.generate(source, count=300, image_size=448, seed=0)
        files = [c.path for c in datasets.dataset(dataset).find(Path(source)).candidates]
        decode_floor(files[:8], workers)  # warm-up (TF start, page cache)
        floors, builds = [], []
        for i in range(repeats):
            floors.append(decode_floor(files, workers))
            out = Path(tmp) / f"out{i}"
            start = time.perf_counter()
            build(dataset, source, out, BuildOptions(progress=False, workers=workers))
            builds.append(time.perf_counter() - start)
    n = len(files)
    return {
        "files": n,
        "workers": workers,
        "decode_floor": _spread([n / s for s in floors]),
        "build": _spread([n / s for s in builds]),
        "build_over_floor": statistics.median(builds) / statistics.median(floors),
    }


def gpu_names() -> list[str]:
    """The name of each GPU TensorFlow sees (e.g. "NVIDIA H100 80GB HBM3"), for the record."""
    import tensorflow as tf

    return [
        tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def _progress(what: str) -> None:
    """One line per measurement on stderr: a bench at 512 px can take many minutes."""
    print(f"bench: measuring {what} ...", file=sys.stderr, flush=True)


def default_precisions(cfg) -> list[str]:
    """The config's precision, and the mixed precision this machine computes natively
    (``train.precision: auto``): ``mixed_float16`` on a GPU, ``mixed_bfloat16`` on a CPU with
    bfloat16 units; none else (emulated bfloat16 measured 0.2x float32 on AVX2 CPUs)."""
    from kerasfrac.training import kernels

    native = kernels.resolve_precision("auto")
    return [cfg.train.precision] + ([native] if native != "float32" else [])


def run(
    cfg,
    what=WHAT,
    steps: int = BenchOptions.steps,
    repeats: int = BenchOptions.repeats,
    precisions=None,
    source=None,
    source_dataset=None,
    workers=None,
    profile: bool = False,
) -> dict:
    unknown = set(what) - set(WHAT)
    if unknown:
        raise ValueError(f"--what {sorted(unknown)}: expected some of {','.join(WHAT)}")
    if steps < 1 or repeats < 1:
        raise ValueError(f"--steps {steps} / --repeats {repeats}: both must be at least 1")
    from kerasfrac.training import kernels

    # train.precision / --precisions "auto": measured as what it resolves to on this machine.
    train_cfg = dataclasses.replace(
        cfg.train, precision=kernels.resolve_precision(cfg.train.precision)
    )
    cfg = dataclasses.replace(cfg, train=train_cfg)
    asked = precisions or default_precisions(cfg)
    precisions = list(dict.fromkeys(kernels.resolve_precision(p) for p in asked))
    result = {
        "config": {
            "dataset": cfg.dataset,
            "image_size": cfg.data.image_size,
            "batch_size": cfg.train.batch_size,
            "flips": cfg.data.flips,
            "oversample": cfg.data.oversample,
            "model": cfg.model.name,
            "precision": cfg.train.precision,
            "fast": cfg.train.fast,
        },
        "steps": steps,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "gpus": gpu_names(),
    }
    if "input" in what or "fit" in what:
        from kerasfrac import data

        data.check_build(cfg.data.dir, cfg.dataset, cfg.train.batch_size)
    if "input" in what:
        result["input"] = bench_input(cfg, steps, repeats)
        _progress("input: kerasfrac against the plain keras-io pipeline")
        result["input_vs_plain"] = bench_input_vs_plain(cfg, steps, repeats)
        per_image = data.cache_bytes_per_image(cfg.data)
        result["cache"] = {
            "dtype": "uint8",
            "bytes_per_image": per_image,
            "float32_bytes_per_image": 4 * per_image,
        }
    if "train" in what:
        result["train"] = bench_train(cfg, steps, repeats, precisions, profile)
    if "fit" in what:
        from kerasfrac.training import kernels

        _progress("fit (input + train)")
        result["fit"] = {**bench_fit(cfg, steps, repeats), "onednn": kernels.onednn_enabled()}
    if "input" in result and "train" in result:  # against the config's own training step
        own = setting_label(cfg.train.fast, cfg.train.precision)
        base = result["train"][own]["images_per_second"]
        result["input_over_train"] = {
            k: v["images_per_second"] / base for k, v in result["input"].items()
        }
    if "build" in what:
        _progress("build against the decode floor")
        result["build"] = bench_build(
            source_dataset or cfg.dataset, Path(source) if source else None, repeats, workers
        )
    return result


def table(result: dict) -> str:
    rows = [("measure", "images/s (median)", "min", "max", "note")]

    def add(name, s, note=""):
        rows.append(
            (name, f"{s['images_per_second']:.1f}", f"{s['min']:.1f}", f"{s['max']:.1f}", note)
        )

    for k, v in result.get("input", {}).items():
        ratio = result.get("input_over_train", {}).get(k)
        note = f"{ratio:.1f}x the train step" if ratio else ""
        if "images_per_cpu_second" in v:
            cost = f"{1000 / v['images_per_cpu_second']:.1f} ms of CPU per image"
            note = f"{note}; {cost}" if note else cost
        add(f"input {k}", v, note)
    if "input_vs_plain" in result:
        p = result["input_vs_plain"]
        add("input plain keras-io", p["plain keras-io"], "decode_jpeg + bilinear, same shards")
        add(
            "input kerasfrac uncached",
            p["kerasfrac"],
            f"{p['ratio']:.2f}x the plain pipeline ({p['cpu_ratio']:.2f}x in CPU time)",
        )
    for k, v in result.get("train", {}).items():
        kernels = f"oneDNN {'on' if v['onednn'] else 'off'}, " if v["onednn"] is not None else ""
        bn = "fused BN" if v["fused_batchnorm"] else "Keras BN"
        add(f"train {k}", v, f"{v['speedup']:.2f}x plain float32 ({kernels}{bn})")
    if "fit" in result:
        f = result["fit"]
        add(
            "fit (input + train)",
            f,
            f"{f['epoch_images']} img/epoch: {f['train_minutes']:.1f} "
            f"min for {f['epochs']} epochs (training steps only)",
        )
    if "build" in result:
        b = result["build"]
        add("decode floor", b["decode_floor"], f"{b['files']} files, {b['workers']} threads")
        add("build", b["build"], f"{b['build_over_floor']:.2f}x the floor's time")
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    c = result["config"]
    head = (
        f"kerasfrac bench: {c['dataset']} {c['image_size']}px batch {c['batch_size']} "
        f"flips={c['flips']} model={c['model']}, {result['cpu_count']} CPUs, "
        f"GPU: {', '.join(result.get('gpus') or ['none'])}"
    )
    lines = [head] + ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    if "cache" in result:
        cache = result["cache"]
        lines.append(
            f"cache: {cache['bytes_per_image']:,} bytes per image ({cache['dtype']}; "
            f"float32 would be {cache['float32_bytes_per_image']:,})"
        )
    from kerasfrac import stepprofile

    for v in result.get("train", {}).values():
        if "profile" in v:
            lines += ["", stepprofile.format_table(v["profile"])]
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":  # one training-step measurement, run by bench_train
    if len(sys.argv) != 3 or sys.argv[1] != "--train-step":
        sys.exit("usage: python -m kerasfrac.bench --train-step SPEC_JSON (run by kerasfrac bench)")
    from kerasfrac import config as _config

    _spec = json.loads(sys.argv[2])
    _figures = measure_train_step(
        _config.from_dict(_spec["config"]), _spec["steps"], _spec["repeats"], _spec["profile"]
    )
    print(json.dumps(_figures))
