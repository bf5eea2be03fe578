"""An unseen patient for the X-ray task: DRRs of the ``chest-ct-2`` example, never used for training.

The ``xray_bones`` models train and are tested on DRRs of one CT (``chest-ct``), so a held-out pose is
the only thing their test holds out. ``chest-ct-2`` is another person (non-contrast chest CT, 128 x 128 x
34 voxels of 3.05 x 3.05 x 10 mm, stored LPS; a 3D Slicer label map on the same grid). Its labels are
projected exactly like chest-ct's (:func:`medistill.tasks.xray_data.render`: the same cone-beam
renderer, pose sampler, detector and PA mirroring), so a model's masks line up channel for channel with
its outputs and Dice on these DRRs measures transfer to a new patient.

* **Classes**: segments are matched by name (case-insensitive), see :data:`UNSEEN_CLASSES`. The set labels
  ribs, vertebrae (cervical + thoracic + lumbar columns) and lungs (right + left); the body outline
  ("tissue") is not a class and is dropped. Model classes the set does not label (clavicles, heart, ...)
  get empty masks and are listed as unknown (``known`` in :func:`unseen_renders`): score only the known ones.
* **Outside the scan field** the scanner stores -3024 HU (the reconstruction circle's padding, not a
  material). Left as is, ``hu_to_mu`` would clip it to 0 anyway, but that is an accident of the clip; we
  set every value below -1000 HU to -1000 (air) on purpose: a radiograph's rays pass through air there
  (or through body parts the CT did not reconstruct, which no CT value can stand for).
* **Orientation**: :func:`medistill.io.images.read_image` turns the LPS file into our RAS affine; the
  renderer works in world mm from that affine, so no axis is flipped here. Tested: the DRR is upright
  (vertebrae reach below the lungs) and the patient's right lung is on the image's left in AP and PA.
* **Resolution**: the CT is rendered at full resolution, no block averaging (it is already coarse: 3 mm
  in-plane, 10 mm slices); labels are never resampled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_savez
from medistill.tasks import xray_data
from medistill.tasks.xray_data import Volume, XrayData

#: The example set that is never trained on.
UNSEEN_EXAMPLE = "chest-ct-2"
#: Its label map (inside the example folder), named in error messages.
SEGMENTATION_FILE = "Segmentation.seg.nrrd"
#: chest-ct-2 segment name (lower case) -> medistill class. "tissue" (the body outline) is not a class.
UNSEEN_CLASSES: dict[str, str] = {
    "ribs": "ribs",
    "cervical vertebral column": "vertebrae",
    "thoracic vertebral column": "vertebrae",
    "lumbar vertebral column": "vertebrae",
    "right lung": "lungs",
    "left lung": "lungs",
}
#: HU below this is set to it: -3024 marks "outside the reconstructed field", and air is -1000.
AIR_HU = -1000.0
#: Bump when the unseen renders change (labels, HU handling) so cached npz files are not reused.
UNSEEN_VERSION = 1


def segment_volume(folder: Path, mapping: dict[str, str], classes: list[str]) -> tuple[Volume, list[str]]:
    """chest-ct-2 as a renderable :class:`~medistill.tasks.xray_data.Volume` with segments grouped.

    ``mapping``: segment name (matched case-insensitively) -> target class; voxels of segments whose
    class is in ``classes`` get label ``classes.index(class) + 1``, every other voxel 0. Returns the
    volume (mu in 1/mm, full resolution, affine voxel -> RAS mm) and the classes of ``classes`` it
    labels, in that order. A needed segment that is absent or has no voxels is an error naming the file.
    """
    from medistill.io.example_formats import load_chest_ct_2
    from medistill.physics.attenuation import hu_to_mu

    folder = Path(folder)
    seg_path = folder / SEGMENTATION_FILE
    ct, lab, names = load_chest_ct_2(folder)
    by_name = {name.strip().lower(): value for name, value in names.items()}
    raw = np.clip(np.rint(lab.array), 0, None).astype(np.int64)
    counts = np.bincount(raw.ravel(), minlength=max(by_name.values(), default=0) + 1)
    lut = np.zeros(len(counts), np.uint8)
    known: list[str] = []
    for segment, target in mapping.items():
        if target not in classes:
            continue
        value = by_name.get(segment.lower())
        if value is None:
            raise MedistillError(
                f"{seg_path}: no segment named {segment!r} (needed for class {target}); "
                f"it has {', '.join(repr(n) for n in names)}"
            )
        if value >= len(counts) or counts[value] == 0:
            raise MedistillError(f"{seg_path}: segment {segment!r} (value {value}) has no voxels")
        lut[value] = classes.index(target) + 1
        if target not in known:
            known.append(target)
    hu = np.maximum(ct.array.astype(np.float32), AIR_HU)  # -3024 = outside the scan field -> air
    volume = Volume(
        hu_to_mu(torch.from_numpy(hu)),
        torch.from_numpy(lut[raw].astype(np.int64)),
        torch.from_numpy(np.asarray(ct.affine, np.float64)),
    )
    return volume, [c for c in classes if c in known]


def load_unseen_volume(folder: Path, classes: list[str]) -> tuple[Volume, list[str]]:
    """chest-ct-2 in the model's class order: label ``c + 1`` = ``classes[c]`` (``classes`` = the model's
    output classes), so rendered masks line up with the model's channels; see :func:`segment_volume`.
    Returns the volume and the classes it labels (model order); the others stay empty."""
    return segment_volume(folder, UNSEEN_CLASSES, list(classes))


def unseen_cache_key(d: XrayData, seed: int, folder: Path) -> str:
    """Hash of what determines the unseen renders: classes, detector, test pose range and count, seed,
    the source folder and the versions of the renderer and of this module."""
    fields = d.model_dump(mode="json", include={"classes", "size", "field_mm", "n_test", "test_poses"})
    blob = json.dumps(
        [xray_data.RENDER_VERSION, UNSEEN_VERSION, fields, seed, str(Path(folder).resolve())], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def unseen_poses(d: XrayData, seed: int) -> list[dict[str, Any]]:
    """``d.n_test`` poses from ``d.test_poses`` on their own random stream (``[seed, 3]``; train, val and
    test use 0, 1, 2), so adding the unseen patient changes no other split."""
    return xray_data.sample_poses(d.n_test, d.test_poses, np.random.default_rng([seed, 3]))


def unseen_renders(
    cache_dir: Path, d: XrayData, seed: int, progress: bool = False, folder: Path | None = None
) -> dict[str, Any]:
    """DRRs of chest-ct-2 at held-out poses, rendered once and cached as ``cache_dir/unseen-<hash>.npz``.

    Returns ``line_integral`` (N H W) float32 in mu x mm, ``masks`` (N C H W) uint8 with C =
    ``len(d.classes)`` in model order (classes the set does not label are all zero), ``known`` (the
    labelled class names, model order), ``poses`` (a JSON string array, as in the other splits'
    files), ``classes`` and ``pixel_mm``. ``folder``: the chest-ct-2 files (default: the example cache).
    """
    if folder is None:
        from medistill.io.examples import example_path

        folder = example_path(UNSEEN_EXAMPLE)
    path = Path(cache_dir) / f"unseen-{unseen_cache_key(d, seed, folder)}.npz"
    if path.exists():
        with np.load(path) as z:
            out: dict[str, Any] = {k: z[k] for k in z.files}
        out["known"] = [str(c) for c in out["known"]]
        return out
    volume, known = load_unseen_volume(folder, d.classes)
    # render only the labelled channels (each costs a projection), then place them in model order
    channels = [d.classes.index(c) for c in known]
    lut = torch.zeros(len(d.classes) + 1, dtype=torch.int64)
    lut[torch.tensor(channels) + 1] = torch.arange(1, len(channels) + 1)
    compact = Volume(volume.mu_per_mm, lut[volume.labels], volume.affine)
    poses = unseen_poses(d, seed)
    lines, part = xray_data.render(compact, poses, d.size, d.field_mm, progress)
    masks = np.zeros((len(poses), len(d.classes), d.size, d.size), np.uint8)
    masks[:, channels] = part[:, : len(channels)]
    out = {
        "line_integral": lines,
        "masks": masks,
        "known": np.asarray(known),
        "poses": np.asarray(json.dumps(poses)),
        "classes": np.asarray(d.classes),
        "pixel_mm": np.asarray(d.field_mm / d.size),
    }
    atomic_savez(path, out)
    out["known"] = list(known)
    return out
