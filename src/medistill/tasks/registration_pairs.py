"""Own registration datasets: a JSON file of real pairs to train, validate and test on (``data.pairs_file``).

Why: the synthetic cohorts measure recovery of known fields from one volume; a user registers a cohort of
their own scans. The file lists pairs per split, MSD-style::

    {"training":   [{"fixed": {"image": "a.nii.gz", "label": "a_seg.nii.gz"},
                     "moving": {"image": "b.nii.gz", "label": "b_seg.nii.gz"}}, ...],
     "validation": [...],
     "test":       [...],
     "labels":     {"liver": [1], "spleen": [2]}}

Each pair is a :class:`~medistill.tasks.registration_real.RealPair` (``fixed``, ``moving``, optional
``name``, ``prealign``; a side is ``{image, label}`` with the file's ``labels`` and optional ``modality``,
or an example set ``{example: chest-ct}``); paths are relative to the JSON file's folder. Every side needs a
label map: validation picks checkpoints by Dice of the warped labels and ``evaluate`` scores the test pairs
by it (no known field: no TRE). Each pair is read, pre-aligned by the shared classical affine of the real
pairs and resampled onto the fixed image's network grid once (:func:`aligned_pair`), then trained on with
the same random B-spline augmentation of the moving image as the synthetic pairs. The whole file (JSON,
every path, every pair's structure names) is checked when the run starts; the pairs are read when first
needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.tasks.registration_data import Modality, pair_item
from medistill.tasks.registration_real import RealPair, load_aligned_pair

SPLITS = {"training": "train", "validation": "val", "test": "test"}


def read_pairs_file(path: Path) -> dict[str, list[RealPair]]:
    """``{train, val, test: [RealPair]}`` of a pairs file, checked (one line naming the entry and the
    problem); own ``image`` / ``label`` paths made absolute from the file's folder."""
    where = f"data.pairs_file ({path})"
    if not path.is_file():
        raise MedistillError(f"{where}: no such file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedistillError(f"{where}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("training"), list) or not raw["training"]:
        raise MedistillError(f"{where}: expected an object with a non-empty 'training' list of pairs")
    unknown = sorted(set(raw) - set(SPLITS) - {"labels", "name", "description"})
    if unknown:
        raise MedistillError(
            f"{where}: unknown key(s) {unknown}; expected training, validation, test, labels"
        )
    labels = raw.get("labels")
    out: dict[str, list[RealPair]] = {}
    for key, split in SPLITS.items():
        entries = raw.get(key, [])
        if split != "train" and not entries:
            raise MedistillError(f"{where}: '{key}' needs at least one pair (with label maps)")
        pairs = []
        for i, entry in enumerate(entries):
            here = f"{where} {key}[{i}]"
            if not isinstance(entry, dict):
                raise MedistillError(f"{here}: expected {{fixed: ..., moving: ...}}")
            entry = dict(entry)
            for side in ("fixed", "moving"):
                v = dict(entry.get(side) or {})
                for field in ("image", "label"):
                    if v.get(field) is not None:
                        p = Path(v[field])
                        v[field] = str(p if p.is_absolute() else path.parent / p)
                        if not Path(v[field]).exists():
                            raise MedistillError(f"{here}.{side}.{field}: {v[field]} not found")
                if "image" in v and v.get("labels") is None and labels is not None:
                    v["labels"] = labels
                entry[side] = v
            try:
                pairs.append(RealPair.model_validate(entry))
            except ValidationError as err:
                e = err.errors()[0]
                loc = ".".join(str(x) for x in e["loc"])
                raise MedistillError(f"{here}.{loc}: {e['msg']}") from None
        out[split] = pairs
    return out


class AlignedPairs(KeyedDataset):
    """Pre-aligned real pairs (``fixed``, ``moving`` ``1 S S S``; ``fixed_labels``, ``moving_labels``
    structure indices); training augments the moving image by a random smooth field (its labels are
    not used by training)."""

    def __init__(self, pairs: list[dict[str, Any]], augment: float) -> None:
        self.pairs, self.augment = pairs, augment

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        p = self.pairs[index]
        return pair_item(p["fixed"], p["moving"], p["fixed_labels"], p["moving_labels"], self.augment, rng)


def align_pairs(
    pairs: list[RealPair],
    split: str,
    size: int,
    default: Modality,
    hu_window: tuple[float, float],
    threads: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every pair of a split read, pre-aligned and on its fixed network grid, and the structure names
    (the same for every pair, checked)."""
    from rich.progress import track

    out, names = [], None
    for k, spec in enumerate(track(pairs, description=f"aligning {split} pairs", disable=len(pairs) < 4)):
        where = f"data.pairs_file {split}[{k}]"
        pair = load_aligned_pair(spec, where, size, default, hu_window, threads)
        if names is not None and pair["structures"] != names:
            raise MedistillError(
                f"{where}: structures {pair['structures']} differ from the first pair's {names}"
            )
        names = pair["structures"]
        out.append(pair)
    return out, names or []
