"""Is a chest segmentation of a frontal radiograph anatomically plausible? Judged without a reference mask.

A real radiograph rarely comes with a label, so a prediction on it can only be judged by anatomy: two lung
fields, one on each side; a heart between them, towards the patient's left, low in the chest. The rules
assume a frontal (PA or AP) film displayed conventionally: head up, the patient's right on the image's
LEFT (the radiological convention; PA and AP renders in :mod:`medistill.tasks.xray_data` both follow it).

Lung *fields* are found as the lung mask minus the mediastinal structures that overlap it in projection
(the heart, and the vertebrae when given): a lung label built from projections (DRR-trained models mark
every pixel whose ray crosses lung) includes the lung seen behind the heart and beside the spine, and is
one silhouette across the midline (measured: 72 of 72 DRR labels of the ``chest-ct`` example, one
connected component; with heart and vertebrae removed, two). Radiological lung-field annotations, which
exclude the mediastinum already, are left as they are. The thresholds below were checked against those
72 DRR labels (128 x 128, 430 mm field, poses 0-15 deg oblique), which all pass; each says why it is
where it is. Everything is measured on a copy at most :data:`ANALYSIS_MAX_PX` pixels long (fractions and
centroids barely change, and the opening stays cheap on a 2000-pixel film); positions are reported as
fractions of the image width/height, so they do not depend on that grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from medistill.errors import MedistillError

#: Longest side of the grid the masks are judged on (strided copy): enough for 1 % features, fast.
ANALYSIS_MAX_PX = 512
#: Opening radius as a fraction of the short side (~4 mm on a 43 cm film): removes specks and thin bridges.
OPENING_FRACTION = 0.01
#: A component smaller than this fraction of the image is a speck, not a lung field or a heart.
MIN_COMPONENT_FRACTION = 0.01
#: A lung field must have at least this share of its pixels in its own image half (DRR labels: >= 0.85).
OWN_HALF_MIN = 0.70
#: Each lung field, fraction of the image: DRR labels 0.10-0.23 of a 430 mm field; a wider field (neck and
#: abdomen, as on RG1) shows a lung smaller, a film collimated to the chest larger; outside is not a lung.
LUNG_FIELD_FRACTION = (0.04, 0.30)
#: Both fields together (DRR labels 0.21-0.40): below, the lungs are mostly missed; above, the "lungs"
#: are spilling over the mediastinum, the abdomen or the whole image.
LUNGS_TOTAL_FRACTION = (0.10, 0.55)
#: The heart, fraction of the image: DRR labels 0.06-0.10; room for a wide field (smaller) and for
#: cardiomegaly (larger); under 2 % is a speck, over 20 % is not one heart.
HEART_FRACTION = (0.02, 0.20)
#: Heart centroid across, 0 = image-left lung centroid, 1 = image-right one: between them (0, 1), and past
#: the midline between them (0.5) towards the patient's left = image right (DRR labels: 0.58-0.77).
HEART_SIDE_MIN = 0.5
#: Heart centroid down the lung span, 0 = highest lung pixel, 1 = lowest: the heart sits on the diaphragm,
#: below the upper 40 % of the chest (DRR labels: 0.47-0.63); past 0.85 it would hang below the bases.
HEART_ROW_RANGE = (0.40, 0.85)
#: Structures removed from the lung mask before the fields are found: they overlap lung in projection.
MEDIASTINAL = ("heart", "vertebrae")

VIEWS = ("frontal",)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


def _components(mask: np.ndarray, structure: np.ndarray) -> list[np.ndarray]:
    """Connected components of ``mask`` after an opening, largest first, specks dropped."""
    opened = ndimage.binary_opening(mask, structure=structure)
    labels, n = ndimage.label(opened)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(sizes)[::-1]
    return [labels == k + 1 for k in order if sizes[k] >= MIN_COMPONENT_FRACTION * mask.size]


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(row, column) centroid as fractions of the image height and width (pixel centres)."""
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return float((rows.mean() + 0.5) / h), float((cols.mean() + 0.5) / w)


def _inside(value: float | None, bounds: tuple[float, float]) -> bool:
    return value is not None and bounds[0] <= value <= bounds[1]


def _check_masks(masks: dict[str, np.ndarray], view: str) -> dict[str, np.ndarray]:
    if view not in VIEWS:
        raise MedistillError(
            f"view {view!r}: plausibility rules exist for {', '.join(VIEWS)} chest films only"
        )
    missing = [k for k in ("lungs", "heart") if k not in masks]
    if missing:
        raise MedistillError(
            f"chest plausibility needs masks {' and '.join(repr(k) for k in missing)} "
            f"(got {', '.join(sorted(masks)) or 'none'})"
        )
    arrays = {k: np.asarray(v) for k, v in masks.items()}
    shapes = {k: a.shape for k, a in arrays.items()}
    if len(set(shapes.values())) > 1 or arrays["lungs"].ndim != 2:
        shown = ", ".join(f"{k} {s}" for k, s in shapes.items())
        raise MedistillError(f"chest plausibility needs 2D masks of one shape (H W), got {shown}")
    if arrays["lungs"].size == 0:
        raise MedistillError("chest plausibility: the masks are empty arrays (shape (0, ...))")
    step = max(1, math.ceil(max(arrays["lungs"].shape) / ANALYSIS_MAX_PX))
    return {k: a[::step, ::step] > 0 for k, a in arrays.items()}


def chest_plausibility(masks: dict[str, np.ndarray], *, view: str = "frontal") -> dict[str, Any]:
    """Anatomical checks of a frontal chest segmentation: ``masks`` maps class names to ``H W`` masks on
    the image grid (bool or 0/255; ``lungs`` and ``heart`` required, ``vertebrae`` used when given).

    Returns ``{"view", "plausible", "failed": [names], "checks": {name: {"ok": bool, numbers...}},
    "thresholds"}`` (JSON-ready). Checks: ``two_lung_fields`` (two fields, each mostly in its own image
    half), ``lung_field_sizes``, ``heart_found``, ``heart_between_lungs``, ``heart_towards_patient_left``,
    ``heart_low_in_lung_span``; see the module constants for the bounds and their reasons.
    """
    m = _check_masks(masks, view)
    h, w = m["lungs"].shape
    structure = _disk(max(1, round(OPENING_FRACTION * min(h, w))))
    fields_mask = m["lungs"].copy()
    subtracted = [k for k in MEDIASTINAL if k in m]
    for k in subtracted:
        fields_mask &= ~m[k]
    fields = _components(fields_mask, structure)
    pair = sorted(fields[:2], key=lambda f: _centroid(f)[1])  # image-left (patient's right) first
    halves = (np.s_[:, : w // 2], np.s_[:, w // 2 :])  # the image-left field's own half, then the right's
    own_half = [float(f[half].sum() / f.sum()) for f, half in zip(pair, halves, strict=False)]
    field_fractions = [float(f.mean()) for f in pair]
    total = float(sum(field_fractions))
    checks: dict[str, dict[str, Any]] = {
        "two_lung_fields": {
            "ok": len(pair) == 2 and min(own_half) >= OWN_HALF_MIN,
            "n_fields": len(fields),
            "fraction_in_own_half": own_half,
        },
        "lung_field_sizes": {
            "ok": bool(pair)
            and all(_inside(f, LUNG_FIELD_FRACTION) for f in field_fractions)
            and _inside(total, LUNGS_TOTAL_FRACTION),
            "fraction_of_image": field_fractions,
            "total_fraction": total,
            "lungs_mask_fraction": float(m["lungs"].mean()),
        },
    }
    hearts = _components(m["heart"], structure)
    heart = hearts[0] if hearts else None
    heart_fraction = float(heart.mean()) if heart is not None else 0.0
    checks["heart_found"] = {
        "ok": _inside(heart_fraction, HEART_FRACTION),
        "fraction_of_image": heart_fraction,
    }
    across = down = None
    if heart is not None and len(pair) == 2:
        hy, hx = _centroid(heart)
        (_, x0), (_, x1) = _centroid(pair[0]), _centroid(pair[1])
        across = (hx - x0) / (x1 - x0) if x1 > x0 else None
        rows = np.nonzero(pair[0] | pair[1])[0]
        top, bottom = (rows.min() + 0.5) / h, (rows.max() + 0.5) / h
        down = (hy - top) / (bottom - top) if bottom > top else None
    checks["heart_between_lungs"] = {"ok": across is not None and 0 < across < 1, "relative_x": across}
    checks["heart_towards_patient_left"] = {
        "ok": across is not None and across > HEART_SIDE_MIN,
        "relative_x": across,
    }
    checks["heart_low_in_lung_span"] = {"ok": _inside(down, HEART_ROW_RANGE), "relative_y": down}
    for c in checks.values():
        c["ok"] = bool(c["ok"])
    failed = [k for k, c in checks.items() if not c["ok"]]
    return {
        "view": view,
        "plausible": not failed,
        "failed": failed,
        "checks": checks,
        "subtracted_from_lungs": subtracted,
        "thresholds": {
            "own_half_min": OWN_HALF_MIN,
            "lung_field_fraction": list(LUNG_FIELD_FRACTION),
            "lungs_total_fraction": list(LUNGS_TOTAL_FRACTION),
            "heart_fraction": list(HEART_FRACTION),
            "heart_side_min": HEART_SIDE_MIN,
            "heart_row_range": list(HEART_ROW_RANGE),
        },
    }
