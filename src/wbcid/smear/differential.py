"""A differential as hematologists read it: each type's share of the cells counted, its exact
(Clopper-Pearson) 95 % binomial interval (the interval behind Rümke's tables for manual
differentials), and whether it lies outside the reference range, conclusively or not.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from scipy.special import betaincinv

from ..contract import QUANTILE
from ..data import CLASSES, parse_label
from ..errors import WbcidError

# Adult reference ranges of the differential, in percent. Laboratories differ (method, population):
# pass your own with ``reference=`` / ``--reference ranges.json``.
REFERENCE_RANGES: dict[str, tuple[float, float]] = {
    "neutrophil": (40.0, 75.0),
    "lymphocyte": (12.0, 44.0),
    "monocyte": (4.0, 9.0),
    "eosinophil": (0.0, 5.5),
    "basophil": (0.0, 1.0),
}
REFERENCE_SOURCE = (
    "adult ranges as specified for wbcid; not a laboratory's validated "
    "reference intervals: replace them with your laboratory's own (--reference)"
)


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a proportion ``k / n``, as fractions.

    The beta quantiles that ``scipy.stats.binomtest(k, n).proportion_ci(method="exact")`` returns,
    taken from ``scipy.special`` directly: importing scipy.stats cost ``wbcid count`` 0.9 s.
    """
    tail = (1 - confidence) / 2
    low = betaincinv(k, n - k + 1, tail) if k > 0 else 0.0
    high = betaincinv(k + 1, n - k, 1 - tail) if k < n else 1.0
    return float(low), float(high)


def unfamiliar(unlike: int, scored: int, cells: str = "cells") -> str | None:
    """What to do when clearly more of ``scored`` cells are flagged as unlike the model's training cells
    (``unlike``) than its threshold flags of its own validation cells (1 - QUANTILE, 5 %), else None.
    "Clearly": the lower end of the exact 95 % interval of the share above twice that, room reasoned
    for labs a model learned less well (the bundled model flags 1.2-16.2 % of its five labs' test cells,
    docs/ood_bundled.md), far below what a lab the model never saw gives (the PBC-only model: 4.8 % of
    PBC's test cells, 46-95 % of each other lab's, docs/ood.md)."""
    usual = 1 - QUANTILE
    if not scored or proportion_interval(unlike, scored)[0] <= 2 * usual:
        return None
    return (
        f"{unlike} of {scored} {cells} ({100 * unlike / scored:.0f} %) are flagged as unlike the model's "
        f"training cells, against {100 * usual:.0f} % of its validation cells: these images differ from those it "
        "learned from. Verify some with `wbcid review`; `wbcid adapt` then learns this lab from them, and flags its "
        "ordinary cells no more (README: Your lab)"
    )


def differential(labels: Sequence[str], reference: dict[str, tuple[float, float]] | None = None) -> dict:
    """Count and percentage of each class with its 95 % interval and reference-range flag.

    ``flag`` is ``"low"``/``"high"`` when the percentage lies outside the range; ``conclusive``
    says whether the whole interval does, i.e. whether the count is large enough to tell.
    """
    reference = REFERENCE_RANGES if reference is None else reference
    unknown = set(labels) - set(CLASSES)
    if unknown:
        raise WbcidError(f"not one of the five classes: {sorted(unknown)}")
    n = len(labels)
    classes = {}
    for name in CLASSES:
        k = sum(label == name for label in labels)
        lo_ref, hi_ref = reference[name]
        if n == 0:  # nothing counted: no percentage, no flag (JSON has no NaN)
            classes[name] = {
                "count": 0,
                "percent": None,
                "ci95": None,
                "reference": [lo_ref, hi_ref],
                "flag": None,
                "conclusive": False,
            }
            continue
        low, high = proportion_interval(k, n)
        percent = 100 * k / n
        flag = "low" if percent < lo_ref else "high" if percent > hi_ref else None
        conclusive = bool(flag) and (100 * high < lo_ref if flag == "low" else 100 * low > hi_ref)
        classes[name] = {
            "count": k,
            "percent": percent,
            "ci95": [100 * low, 100 * high],
            "reference": [lo_ref, hi_ref],
            "flag": flag,
            "conclusive": conclusive,
        }
    return {"counted": n, "classes": classes}


def read_reference(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """Reference ranges in percent from JSON ``{"neutrophil": [40, 75], ...}``: every class, nothing else
    (named as class folders may be: ``Neutrophils``, ``Lymphozyten``)."""
    example = f'{{"neutrophil": [40, 75], ...}} for each of {", ".join(CLASSES)}'
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WbcidError(f"{path}: cannot read reference ranges ({exc}); expected JSON like {example}") from exc
    if not isinstance(raw, dict):
        raise WbcidError(f"{path}: expected a JSON object like {example}")
    problems, named = [], {}  # class -> (key, value); keys read as --data reads class folders ("Neutrophils")
    for key, value in raw.items():
        index = parse_label(key)
        if index is None:
            problems.append(f"unknown class {key!r}")
        elif CLASSES[index] in named:
            problems.append(f"{named[CLASSES[index]][0]!r} and {key!r} both name {CLASSES[index]}")
        else:
            named[CLASSES[index]] = key, value
    problems += [f"{name} is missing" for name in CLASSES if name not in named]
    ranges = {}
    for name, (_, value) in named.items():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)):
            problems.append(f"{name} must be [low, high], not {value!r}")
            continue
        low, high = map(float, value)
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high <= 100):
            problems.append(f"{name} [{low:g}, {high:g}] is not a range 0 <= low <= high <= 100")
        ranges[name] = (low, high)
    if not problems and all(high <= 1 for _, high in ranges.values()):
        problems.append("every upper limit is <= 1: give percentages (e.g. 40-75), not fractions")
    if problems:
        raise WbcidError(f"{path}: {'; '.join(problems)} (expected percentages, JSON like {example})")
    return {name: ranges[name] for name in CLASSES}
