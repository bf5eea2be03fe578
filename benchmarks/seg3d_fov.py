"""seg3d field-of-view table: per-organ Dice of a trained stage on chest-ct cropped like the cohort, that
crop padded with air, and the whole CT (the CT the synthetic cohort is made from).

    python benchmarks/seg3d_fov.py RUN [--stage teacher] [--pad-mm 42] [--json out.json]

Each stage is fed with the normalisation it was trained with (``RUN/<stage>/normalisation.json``, or the
volume z-score for stages trained before that record existed). Read-only on RUN.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from medistill.io.examples import example_file
from medistill.io.images import Image, read_image
from medistill.metrics.segmentation import dice
from medistill.runs import open_run
from medistill.tasks.cohort import CROP_ORGANS, WORD_FROM_TOTALSEG, WORD_LABELS
from medistill.tasks.segmentation3d import crop_padded

ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas")


def variants(
    ct: Image, word: np.ndarray, margin_mm: float, pad_mm: float
) -> dict[str, tuple[Image, np.ndarray]]:
    """crop (the cohort's crop: bounding box of the main organs + margin), padded (+ air), whole."""
    organ = np.isin(word, [WORD_LABELS[n] for n in CROP_ORGANS])
    axes = [np.flatnonzero(organ.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    spacing = np.asarray(ct.spacing)
    margin = np.ceil(margin_mm / spacing).astype(int)
    lo = np.maximum(np.array([a[0] for a in axes]) - margin, 0)
    hi = np.minimum(np.array([a[-1] + 1 for a in axes]) + margin, word.shape)
    pad = np.ceil(pad_mm / spacing).astype(int)
    out = {}
    for name, start, size in (("crop", lo, hi - lo), ("padded", lo - pad, hi - lo + 2 * pad)):
        affine = ct.affine.copy()
        affine[:3, 3] = ct.affine[:3, :3] @ start + ct.affine[:3, 3]
        out[name] = (
            Image(crop_padded(np.asarray(ct.array), start, size, -1000.0), affine),
            crop_padded(word, start, size, 0),
        )
    out["whole"] = (ct, word)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--stage", action="append", help="stage(s) to measure (default: every trained one)")
    parser.add_argument("--pad-mm", type=float, default=42.0)
    parser.add_argument("--margin-mm", type=float, default=12.0, help="the cohort's crop margin")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    task = open_run(args.run)
    ct = read_image(example_file("chest-ct", "cxr.nii.gz"))
    src = np.rint(read_image(example_file("chest-ct", "mask.nii.gz")).array).astype(np.int64)
    lut = np.zeros(int(src.max()) + 1, dtype=np.int64)
    for name, ids in WORD_FROM_TOTALSEG.items():
        lut[[i for i in ids if i < len(lut)]] = WORD_LABELS[name]
    cases = variants(ct, lut[src], args.margin_mm, args.pad_mm)
    result: dict[str, dict] = {}
    for stage in args.stage or task.stage_names():
        net, norm = task.stage_model(stage), task.stage_normalisation(stage)
        result[stage] = {"normalisation": norm.scheme}
        for case, (img, truth) in cases.items():
            pred = task.predict_volume(net, img, norm)
            result[stage][case] = {
                o: round(dice(pred == WORD_LABELS[o], truth == WORD_LABELS[o]), 3) for o in ORGANS
            }
            result[stage][case]["shape"] = list(img.shape)
            print(stage, norm.scheme, case, img.shape, result[stage][case], flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
