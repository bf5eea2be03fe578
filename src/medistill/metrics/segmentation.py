"""Segmentation metrics on binary masks (never on colour-coded or soft images) that say what they count.

Dice and HD95 come from MONAI (``compute_dice``, ``compute_hausdorff_distance`` with voxel spacing, so
HD95 is in mm). What MONAI leaves open, we decide once here, for every task:

* every structure of a case gets a **status**: ``hit`` (truth and prediction non-empty), ``miss`` (truth
  present, prediction empty), ``false_positive`` (truth empty, prediction non-empty), ``empty`` (both
  empty);
* a miss or a false positive is **penalised, never dropped**: Dice 0 and HD95 = the image diagonal in mm
  (the largest distance the grid can hold), so a model cannot improve its mean by predicting nothing;
* empty vs empty is undefined (NaN), **excluded** from every mean and **counted**;
* the ``+-`` of a summary is the sample standard deviation (ddof 1) **over cases**, stated in the dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from medistill.errors import MedistillError

STATUSES = ("hit", "miss", "false_positive", "empty")
SD_DDOF = 1
PENALTY_NOTE = "miss or false positive: Dice 0, HD95 = image diagonal (mm); empty vs empty excluded"

Masks = np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor]


def _bool_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return (
        x.detach().cpu().bool()
        if isinstance(x, torch.Tensor)
        else torch.from_numpy(np.asarray(x, dtype=bool))
    )


def _status(p: torch.Tensor, t: torch.Tensor) -> str:
    p_any, t_any = bool(p.any()), bool(t.any())
    if t_any:
        return "hit" if p_any else "miss"
    return "false_positive" if p_any else "empty"


def _dice_of(p: torch.Tensor, t: torch.Tensor, status: str) -> float:
    """MONAI's Dice for a hit; 0 for a miss or false positive; NaN for empty vs empty."""
    if status == "empty":
        return float("nan")
    if status != "hit":
        return 0.0
    return float(compute_dice(p[None, None].float(), t[None, None].float(), ignore_empty=False).item())


def dice(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice (MONAI) of two binary masks of the same shape; **NaN when both are empty** (undefined: a mean
    over such values turns NaN instead of being silently inflated by 1.0). Use :func:`score_structures`
    and :func:`summarise` to exclude and count those cases."""
    p, t = _bool_tensor(pred), _bool_tensor(target)
    if p.shape != t.shape:
        raise MedistillError(
            f"dice: prediction shape {tuple(p.shape)} differs from target shape {tuple(t.shape)}"
        )
    return _dice_of(p, t, _status(p, t))


def dice_per_label(pred: np.ndarray, target: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """Dice for each named label value of two integer label maps (NaN where the label is in neither)."""
    return {name: dice(pred == value, target == value) for name, value in labels.items()}


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """Length of the image grid's diagonal, ``sqrt(sum((n_i * s_i)^2))`` in mm: the HD95 penalty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm, strict=True))))


def _named_channels(masks: Masks, names: Sequence[str] | None, what: str) -> dict[str, torch.Tensor]:
    if isinstance(masks, Mapping):
        return {str(k): _bool_tensor(v) for k, v in masks.items()}
    m = _bool_tensor(masks)
    names = [str(k) for k in range(m.shape[0])] if names is None else list(names)
    if m.ndim < 2 or len(names) != m.shape[0]:
        raise MedistillError(
            f"{what}: expected C x spatial masks with C = {len(names)}, got {tuple(m.shape)}"
        )
    return dict(zip(names, m, strict=True))


def score_structures(
    pred: Masks,
    truth: Masks,
    spacing_mm: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per structure of one case: ``{"dice", "hd95_mm", "status"}``.

    Args:
        pred, truth: binary masks ``C *spatial`` (2D or 3D), or dicts ``{name: mask}`` with the same keys.
        spacing_mm: voxel spacing per spatial axis (mm). Without it only Dice and status are returned
            (e.g. when a batch of images has no common pixel spacing).
        names: structure names for array input (default ``"0" .. "C-1"``).

    A miss or false positive scores Dice 0 and HD95 = :func:`image_diagonal_mm`; empty vs empty scores
    NaN for both (excluded by :func:`summarise`, which counts it).
    """
    p_all, t_all = _named_channels(pred, names, "prediction"), _named_channels(truth, names, "truth")
    if list(p_all) != list(t_all):
        raise MedistillError(
            f"score_structures: prediction names {list(p_all)} differ from truth {list(t_all)}"
        )
    out: dict[str, dict[str, Any]] = {}
    for name, p in p_all.items():
        t = t_all[name]
        if p.shape != t.shape:
            raise MedistillError(
                f"{name}: prediction shape {tuple(p.shape)} differs from truth {tuple(t.shape)}"
            )
        status = _status(p, t)
        score: dict[str, Any] = {"dice": _dice_of(p, t, status), "status": status}
        if spacing_mm is not None:
            if len(spacing_mm) != p.ndim:
                raise MedistillError(f"{name}: spacing_mm {list(spacing_mm)} does not match a {p.ndim}D mask")
            if status == "hit":
                hd = compute_hausdorff_distance(
                    p[None, None],
                    t[None, None],
                    include_background=True,
                    percentile=95,
                    spacing=list(spacing_mm),
                )
                score["hd95_mm"] = float(hd.item())
            elif status == "empty":
                score["hd95_mm"] = float("nan")
            else:
                score["hd95_mm"] = image_diagonal_mm(p.shape, spacing_mm)
        out[name] = score
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    mean = float(a.mean()) if a.size else float("nan")
    sd = float(a.std(ddof=SD_DDOF)) if a.size > SD_DDOF else float("nan")
    return mean, sd


def _stats(entries: list[dict[str, Any]], counts: dict[str, int]) -> dict[str, Any]:
    """Mean and SD over ``entries`` (one per case, already excluding empty vs empty), with the counts."""
    dm, ds = _mean_sd([e["dice"] for e in entries])
    stats: dict[str, Any] = {"dice": dm, "dice_sd": ds}
    if entries and all("hd95_mm" in e for e in entries):
        hm, hs = _mean_sd([e["hd95_mm"] for e in entries])
        stats |= {"hd95_mm": hm, "hd95_sd_mm": hs}
    return stats | {"n": len(entries), **counts, "sd_over": "cases", "sd_ddof": SD_DDOF}


def summarise(cases: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Mean +- SD over cases of :func:`score_structures` results ``{case: {structure: score}}``.

    Returns ``{"structures": {name: stats}, "overall": stats, "n_cases", "sd_over": "cases", ...}``; each
    ``stats`` holds ``dice``, ``dice_sd`` (and ``hd95_mm``, ``hd95_sd_mm`` when scored with spacing), ``n``
    (cases that entered the mean), ``misses``, ``false_positives``, ``empty_excluded``. ``overall`` first
    averages each case over its entered structures, then takes mean and SD over those cases (``n`` =
    cases with at least one entered structure); its counts are totals over structures.
    """
    names: list[str] = []
    for scores in cases.values():
        names += [n for n in scores if n not in names]
    per_structure: dict[str, dict[str, Any]] = {}
    totals = {"misses": 0, "false_positives": 0, "empty_excluded": 0}
    for name in names:
        statuses = [s[name]["status"] for s in cases.values() if name in s]
        unknown = set(statuses) - set(STATUSES)
        if unknown:
            raise MedistillError(
                f"summarise: {name} has unknown status {sorted(unknown)}; expected {STATUSES}"
            )
        counts = {
            "misses": statuses.count("miss"),
            "false_positives": statuses.count("false_positive"),
            "empty_excluded": statuses.count("empty"),
        }
        totals = {k: totals[k] + v for k, v in counts.items()}
        entered = [s[name] for s in cases.values() if name in s and s[name]["status"] != "empty"]
        per_structure[name] = _stats(entered, counts)
    per_case = []
    for scores in cases.values():
        entered = [v for v in scores.values() if v["status"] != "empty"]
        if entered:
            case = {"dice": float(np.mean([v["dice"] for v in entered]))}
            if all("hd95_mm" in v for v in entered):
                case["hd95_mm"] = float(np.mean([v["hd95_mm"] for v in entered]))
            per_case.append(case)
    return {
        "structures": per_structure,
        "overall": _stats(per_case, totals),
        "n_cases": len(cases),
        "sd_over": "cases",
        "sd_ddof": SD_DDOF,
        "penalty": PENALTY_NOTE,
    }


def _pm(mean: float, sd: float, scale: float) -> str:
    if not math.isfinite(mean):
        return "–"
    return f"{scale * mean:.1f} ± {scale * sd:.1f}" if math.isfinite(sd) else f"{scale * mean:.1f}"


def counts_caption(counts: Mapping[str, Mapping[str, int]], unit: str = "cases", hd95: bool = True) -> str:
    """One sentence per table: n, what the ± is taken over, the penalty, and per model the misses, false
    positives and empty-vs-empty exclusions. ``counts`` is ``{model: {"n_cases", "misses",
    "false_positives", "empty_excluded"}}`` (as in :func:`summary_row`)."""
    per_model = "; ".join(
        f"{m}: {c['misses']} missed, {c['false_positives']} false positive, "
        f"{c['empty_excluded']} empty-vs-empty excluded"
        for m, c in counts.items()
    )
    n = "/".join(str(v) for v in sorted({c["n_cases"] for c in counts.values()}))
    penalty = PENALTY_NOTE if hd95 else PENALTY_NOTE.replace(", HD95 = image diagonal (mm)", "")
    return (
        f"n = {n} {unit} per model; ± is the sample SD over {unit}; a structure's n excludes its "
        f"empty-vs-empty {unit}. {penalty[0].upper() + penalty[1:]}. Counts (structure x {unit}): "
        f"{per_model}."
    )


def summary_markdown(summaries: Mapping[str, Mapping[str, Any]], unit: str = "cases") -> str:
    """A Markdown table, structure x model, of Dice % (and HD95 mm when scored) as mean ± SD over
    ``unit``, a last row with the per-case mean over structures, and a caption from :func:`counts_caption`.

    ``summaries`` is ``{model: summarise(...)}``. A summary without ``"overall"`` (only its structures
    kept) gets a last row "mean of structures" instead: the mean of the structure means, without ±.
    """
    models = list(summaries)
    first = next(iter(summaries.values()), {"structures": {}})
    structures = list(first["structures"])
    with_hd = all("hd95_mm" in st for s in summaries.values() for st in s["structures"].values())
    cols = (
        [f"{m} Dice %" for m in models]
        if not with_hd
        else [c for m in models for c in (f"{m} Dice %", f"{m} HD95 mm")]
    )
    lines = ["| structure | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]

    def cells(st: Mapping[str, Any]) -> list[str]:
        out = [_pm(st["dice"], st.get("dice_sd", float("nan")), 100.0)]
        return out + ([_pm(st["hd95_mm"], st.get("hd95_sd_mm", float("nan")), 1.0)] if with_hd else [])

    for name in structures:
        row = [c for m in models for c in cells(summaries[m]["structures"][name])]
        n = "/".join(str(summaries[m]["structures"][name]["n"]) for m in models)
        lines.append(f"| {name} (n = {n}) | " + " | ".join(row) + " |")
    if all("overall" in s for s in summaries.values()):
        row = [c for m in models for c in cells(summaries[m]["overall"])]
        lines.append(
            f"| **mean per case** (n = {'/'.join(str(summaries[m]['overall']['n']) for m in models)}) | "
            + " | ".join(row)
            + " |"
        )
        caption = counts_caption({m: summary_row(s) for m, s in summaries.items()}, unit, with_hd)
    else:
        row = []
        for m in models:
            sts = summaries[m]["structures"].values()
            means = {"dice": float(np.nanmean([st["dice"] for st in sts]))}
            if with_hd:
                means["hd95_mm"] = float(np.nanmean([st["hd95_mm"] for st in sts]))
            row += cells(means)
        lines.append("| **mean of structures** | " + " | ".join(row) + " |")
        caption = structures_caption(summaries, unit, with_hd)
    return f"{caption}\n\n" + "\n".join(lines) + "\n"


def structures_caption(
    summaries: Mapping[str, Mapping[str, Any]], unit: str = "cases", hd95: bool = True
) -> str:
    """:func:`counts_caption` for summaries that kept only their structures (counts summed over them)."""
    counts = {}
    for m, s in summaries.items():
        sts = list(s["structures"].values())
        counts[m] = {k: sum(st[k] for st in sts) for k in ("misses", "false_positives", "empty_excluded")}
        counts[m]["n_cases"] = max((st["n"] + st["empty_excluded"] for st in sts), default=0)
    return counts_caption(counts, unit, hd95)


def summarise_batch(
    pred: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    names: Sequence[str],
    spacing_mm: Sequence[float] | None = None,
) -> dict[str, Any]:
    """:func:`summarise` over a batch ``B C *spatial`` of binary masks, each batch item one case."""
    if pred.shape != truth.shape:
        raise MedistillError(f"prediction shape {tuple(pred.shape)} differs from truth {tuple(truth.shape)}")
    return summarise(
        {str(i): score_structures(pred[i], truth[i], spacing_mm, names) for i in range(len(truth))}
    )


def summary_row(summary: Mapping[str, Any]) -> dict[str, float | int]:
    """A flat row of a :func:`summarise` result for a table with one row per model: mean Dice per
    structure, the per-case ``mean`` and its ``mean_sd`` over cases, ``n_cases`` and the counts."""
    o = summary["overall"]
    row: dict[str, float | int] = {name: st["dice"] for name, st in summary["structures"].items()}
    row |= {"mean": o["dice"], "mean_sd": o["dice_sd"], "n_cases": summary["n_cases"]}
    return row | {k: o[k] for k in ("misses", "false_positives", "empty_excluded")}


def rows_markdown(
    rows: Mapping[str, Mapping[str, Any]], structures: Sequence[str], unit: str = "cases"
) -> str:
    """A Markdown table of :func:`summary_row` rows (model x structure, mean Dice over ``unit``, the
    per-case mean ± SD), under a :func:`counts_caption`."""
    cols = [*structures, "mean ± SD"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for model, r in rows.items():
        cells = [f"{r[c]:.3f}" for c in structures]
        cells.append(
            f"{r['mean']:.3f} ± {r['mean_sd']:.3f}" if math.isfinite(r["mean_sd"]) else f"{r['mean']:.3f}"
        )
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return counts_caption(rows, unit, hd95=False) + "\n\n" + "\n".join(lines) + "\n"
