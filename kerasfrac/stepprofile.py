"""Where a training step's time goes: TensorFlow's profiler over a few warmed-up steps,
summed per op kind (``kerasfrac bench --what train --profile``).

The trace (``tf.profiler.experimental``) holds one event per TensorFlow op executed, on the
thread (``tf_Compute/...``) that ran it, named ``scope/name:Type``. Each op's *exclusive* time
(nested events of the same thread, e.g. a function call's body, counted once) goes to one
kind of ``KINDS``, by its type (oneDNN's ``_MklNative``/``_MklFused`` prefixes removed) and,
for the optimizer, by its name scope. oneDNN's own reorders happen inside its kernels and are
counted with them; ``reorders`` holds TensorFlow's layout-conversion ops where it runs any.

``op time`` is the sum over ops; with two inter-op threads ops overlap, so it may exceed the
wall time of the profiled steps (both are reported).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

KINDS = (
    "conv forward",
    "conv backward-data",
    "conv backward-weights",
    "batchnorm forward",
    "batchnorm backward",
    "element-wise",
    "casts",
    "reorders",
    "optimizer",
    "other",
)

#: Op types (after ``base_type``) counted as element-wise.
ELEMENTWISE = {
    "Relu",
    "ReluGrad",
    "Add",
    "AddV2",
    "AddN",
    "Sub",
    "Mul",
    "RealDiv",
    "DivNoNan",
    "Maximum",
    "Minimum",
    "Neg",
    "Square",
    "Sqrt",
    "Rsqrt",
    "Exp",
    "Log",
    "Log1p",
    "Sigmoid",
    "SigmoidGrad",
    "Select",
    "SelectV2",
    "Greater",
    "GreaterEqual",
    "Less",
    "LessEqual",
    "Equal",
    "NotEqual",
    "ZerosLike",
    "OnesLike",
    "BiasAdd",
    "BiasAddGrad",
    "SquaredDifference",
    "Softplus",
    "Abs",
    "Sign",
    "Pow",
    "Reciprocal",
    "ReciprocalGrad",
    "Tile",
    "BroadcastTo",
    "Fill",
    "ClipByValue",
    "ReluBnAddGrad",
}
_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REORDERS = {"_MklToTf", "_MklInputConversion", "DataFormatDimMap", "DataFormatVecPermute"}


def base_type(op_type: str) -> str:
    """``_MklNativeConv2DBackpropFilter`` -> ``Conv2DBackpropFilter``; ``_FusedConv2D`` ->
    ``Conv2D`` (a fused convolution counts as convolution)."""
    if op_type in REORDERS:
        return op_type
    t = re.sub(r"^_Mkl(Native)?", "", op_type)
    return re.sub(r"^_?Fused(?=Conv2D|Matmul|MatMul|DepthwiseConv)", "", t)


def classify(name: str, op_type: str, optimizer_scope: str = "") -> str:
    """The kind (one of ``KINDS``) of the op ``name`` of type ``op_type``."""
    t = base_type(op_type)
    if t in REORDERS:
        return "reorders"
    if t == "Cast":
        return "casts"
    if "Conv2DBackpropFilter" in t or "Conv2dNativeBackpropFilter" in t:
        return "conv backward-weights"
    if "Conv2DBackpropInput" in t or "Conv2dNativeBackpropInput" in t:
        return "conv backward-data"
    if "Conv2D" in t or "Conv2d" in t:
        return "conv forward"
    if t.startswith("FusedBatchNorm"):
        return "batchnorm backward" if "Grad" in t else "batchnorm forward"
    top = name.split("/")[0]  # Keras numbers a repeated scope: adamw, adamw_1, ...
    if t.startswith("ResourceApply") or (
        optimizer_scope and re.fullmatch(re.escape(optimizer_scope) + r"(_\d+)?", top)
    ):
        return "optimizer"
    if t in ELEMENTWISE:
        return "element-wise"
    return "other"


def read_trace(logdir: str) -> list[tuple[str, str, float]]:
    """``(name, type, exclusive ms)`` of every op event in the newest trace under ``logdir``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not files:
        raise RuntimeError(f"profile: TensorFlow's profiler wrote no trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    ops = []
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            if line.name.startswith(("python", "tf_data")):
                continue  # the caller and the input pipeline's own threads
            events = []
            for e in line.events:
                label = plane.event_metadata[e.metadata_id].name
                name, sep, op_type = label.rpartition(":")
                if not sep or "::" in label or not _TYPE.match(op_type):
                    continue  # executor and thread-pool bookkeeping, not an op
                start = line.timestamp_ns * 1000 + e.offset_ps
                events.append((start, start + e.duration_ps, name, op_type))
            ops += _exclusive(events)
    return ops


def _exclusive(events) -> list[tuple[str, str, float]]:
    """Exclusive milliseconds of nested ``(start, end, name, type)`` events on one thread."""
    events.sort(key=lambda e: (e[0], -e[1]))
    out, stack = [], []  # stack: [end, name, type, exclusive_ps]

    def close(item):
        out.append((item[1], item[2], item[3] / 1e9))

    for start, end, name, op_type in events:
        while stack and stack[-1][0] <= start:
            close(stack.pop())
        if stack:
            stack[-1][3] -= min(end, stack[-1][0]) - start
        stack.append([end, name, op_type, end - start])
    while stack:
        close(stack.pop())
    return out


def op_table(ops, optimizer_scope: str = "") -> dict:
    """Milliseconds per kind (every kind of ``KINDS``, in order), their total, and the ten op
    types that took longest."""
    kinds = dict.fromkeys(KINDS, 0.0)
    types: collections.Counter = collections.Counter()
    names: collections.Counter = collections.Counter()
    for name, op_type, ms in ops:
        kinds[classify(name, op_type, optimizer_scope)] += ms
        types[op_type] += ms
        names[f"{name}:{op_type}"] += ms
    return {
        "kinds_ms": kinds,
        "op_ms": sum(kinds.values()),
        "top_types_ms": dict(types.most_common(10)),
        "top_ops_ms": dict(names.most_common(10)),
    }


def profile_step(step, iterator, flag, steps: int, optimizer_scope: str = "") -> dict:
    """Profile ``steps`` calls of a warmed-up ``train.make_train_step`` step: per-kind
    milliseconds per step (``op_table``, divided by ``steps``) and the wall ms per step."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="kerasfrac-profile-") as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            start = time.perf_counter()
            for _ in range(steps):
                out = step(iterator, flag)
            out[0].numpy()  # wait for the last step
            wall = time.perf_counter() - start
        finally:
            tf.profiler.experimental.stop()
        table = op_table(read_trace(logdir), optimizer_scope)
    per = {k: v / steps for k, v in table["kinds_ms"].items()}
    return {
        "steps": steps,
        "wall_ms_per_step": 1000 * wall / steps,
        "op_ms_per_step": table["op_ms"] / steps,
        "kinds_ms_per_step": per,
        "top_types_ms_per_step": {k: v / steps for k, v in table["top_types_ms"].items()},
        "top_ops_ms_per_step": {k: v / steps for k, v in table["top_ops_ms"].items()},
    }


def format_table(profile: dict) -> str:
    """The per-kind table: ms per step and share of op time, then the top op types."""
    total = profile["op_ms_per_step"]
    rows = [("op kind", "ms/step", "share")]
    for kind, ms in profile["kinds_ms_per_step"].items():
        rows.append((kind, f"{ms:.1f}", f"{100 * ms / total:.1f}%" if total else "-"))
    rows.append(("total op time", f"{total:.1f}", "100.0%"))
    rows.append(("wall time", f"{profile['wall_ms_per_step']:.1f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"profile: {profile.get('setting', '')} ({profile['steps']} steps after warm-up)"]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    top = ", ".join(f"{t} {ms:.1f}" for t, ms in profile["top_types_ms_per_step"].items())
    lines.append(f"longest op types (ms/step): {top}")
    ops = profile.get("top_ops_ms_per_step", {})
    lines += ["longest ops (ms/step):"] + [f"  {ms:7.1f}  {op}" for op, ms in ops.items()]
    return "\n".join(lines)
