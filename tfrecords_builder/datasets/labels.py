"""Label values of a user's own data (class folder names, a CSV's label column) -> 1
fractured / 0 normal: the common spellings, plus what ``--fractured-labels`` and
``--normal-labels`` add. TensorFlow-free."""

from __future__ import annotations

from tfrecords_builder.candidates import norm_name

FRACTURED = (
    "fractured",
    "fracture",
    "fractures",
    "positive",
    "pos",
    "abnormal",
    "broken",
    "yes",
    "true",
    "1",
)
NORMAL = (
    "normal",
    "negative",
    "neg",
    "not_fractured",
    "non_fractured",
    "nonfractured",
    "no_fracture",
    "unfractured",
    "no",
    "false",
    "0",
)


def label_map(fractured: tuple[str, ...] = (), normal: tuple[str, ...] = ()) -> dict[str, int]:
    """Normalised value (``norm_name``) -> label; a value given as both is an error."""
    extra = {norm_name(v): 1 for v in fractured}
    both = sorted(v for v in normal if norm_name(v) in extra)
    if both:
        raise ValueError(
            f"label value(s) {both} are given as both fractured (--fractured-labels) and normal "
            "(--normal-labels); give each value one meaning"
        )
    extra.update({norm_name(v): 0 for v in normal})
    common = {**{v: 1 for v in FRACTURED}, **{v: 0 for v in NORMAL}}
    return {**common, **extra}


def label_of(value: str, mapping: dict[str, int]) -> int | None:
    """The label of a value (folder name, CSV cell), or None when it is not declared.
    Numbers such as ``1.0`` count as their integer."""
    name = norm_name(value)
    if name not in mapping:
        try:
            number = float(name)
        except ValueError:
            return None
        name = str(int(number)) if number.is_integer() else name
    return mapping.get(name)


HINT = (
    "name the values with --fractured-labels and --normal-labels (comma-separated; the "
    f"common ones are known already: {', '.join(FRACTURED[:6])}, ... and "
    f"{', '.join(NORMAL[:4])}, ...)"
)
