"""MAR training and test data read lazily from ``medistill simulate metal`` folders (``data.shards``).

Why: a set made by an array job (``simulate metal --shard K/N`` on any scheduler) can hold thousands of
slices at the scanner's size, more than fits in memory. A folder is checked whole when a run starts
(``index.csv``, ``simulation.json``, every listed shard present, the LI and NMAR baselines written), and
then each sample is read from its own ``slice_XXXXX.npz`` only when the data loader asks for it: only its
image arrays are decompressed (the sinograms stay on disk), one sample at a time.

Split: per folder, the slab split of the built-in sources (:func:`medistill.tasks.lung2d.slab_split`,
``data.slab`` slices per slab, one-slice gaps) over its distinct slice indices, so neighbouring slices of
one volume never sit on both sides; ``data.max_train_slices`` / ``data.max_eval_slices`` cap the slices
per folder and split (evenly spaced) as they do per source. Training keeps every mask of a slice;
validation and test keep its first, as the built-in evaluation sets hold one mask per slice.

Images are resampled to ``data.size`` when the folder's scanner size differs: area averaging of the HU
images, and a metal pixel wherever more than 0.3 of it is metal (the rule ``predict`` applies to a real
scan's threshold mask); the pixel size follows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medistill.errors import MedistillError

#: name in a shard -> name in the task's arrays
ARRAYS = {
    "artifact_hu": "artifact",
    "li_hu": "li",
    "nmar_hu": "nmar",
    "free_hu": "free",
    "clean_hu": "clean",
    "metal_mask": "mask",
}
INDEX = "index.csv"
SETTINGS = "simulation.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShardSample:
    """One sample: mask ``mask`` of the shard ``shard`` (axial slice ``slice``) of folder ``folder``."""

    folder: int
    shard: str
    slice: int
    mask: int


class ShardFolders:
    """The samples of ``simulate metal`` folders at ``size`` x ``size`` (checked whole; read lazily)."""

    def __init__(self, folders: list[str], size: int, where: str = "data.shards") -> None:
        self.size = size
        self.folders = [Path(f) for f in folders]
        self.samples: list[ShardSample] = []
        self.pixel_mm: list[float] = []
        self.scale: list[int] = []  # folder's image size
        seen: set[Path] = set()
        for i, folder in enumerate(self.folders):
            here = f"{where}[{i}] ({folder})"
            if folder.resolve() in seen:
                raise MedistillError(f"{here}: listed twice")
            seen.add(folder.resolve())
            for name in (INDEX, SETTINGS):
                if not (folder / name).is_file():
                    raise MedistillError(
                        f"{here}: no {name}; expected the output folder of `medistill simulate metal` "
                        "(an array job writes index.csv when its last part ends)"
                    )
            settings = json.loads((folder / SETTINGS).read_text())
            if not settings.get("baselines"):
                raise MedistillError(
                    f"{here}: simulated without --baselines; MAR training needs the LI image and the "
                    "evaluation NMAR (run `medistill simulate metal ... --baselines` into a new folder)"
                )
            image_size = int(settings["geometry"]["image_size"])
            if image_size < size:
                raise MedistillError(
                    f"{here}: its slices are {image_size}^2, smaller than data.size={size} "
                    "(simulate at the training size or larger)"
                )
            with open(folder / INDEX) as f:
                rows = list(csv.DictReader(f))
            if not rows:
                raise MedistillError(f"{here}: {INDEX} lists no sample")
            missing = sorted({r["shard"] for r in rows if not (folder / r["shard"]).is_file()})
            if missing:
                raise MedistillError(
                    f"{here}: {len(missing)} shard(s) listed in {INDEX} are missing, e.g. {missing[0]}"
                )
            self.pixel_mm.append(float(settings["geometry"]["pixel_mm"]) * image_size / size)
            self.scale.append(image_size)
            self.samples += [ShardSample(i, r["shard"], int(r["slice"]), int(r["mask"])) for r in rows]
        self._last: tuple[ShardSample, dict[str, np.ndarray]] | None = None

    def split(self, slab: int, max_train: int, max_eval: int) -> dict[str, list[ShardSample]]:
        """Samples of each split (see the module docstring)."""
        from medistill.tasks.lung2d import slab_split
        from medistill.tasks.mar import _even

        out: dict[str, list[ShardSample]] = {s: [] for s in SPLITS}
        for i in range(len(self.folders)):
            mine = [s for s in self.samples if s.folder == i]
            zs = sorted({s.slice for s in mine})
            for split, idx in slab_split(len(zs), slab).items():
                chosen = set(_even([zs[j] for j in idx], max_train if split == "train" else max_eval))
                out[split] += [s for s in mine if s.slice in chosen and (split == "train" or s.mask == 0)]
        return out

    def key(self, sample: ShardSample) -> str:
        """A stable name of ``sample`` for ``splits.json``."""
        return f"shards:{self.folders[sample.folder].name}/{Path(sample.shard).stem}_m{sample.mask}"

    def read(self, sample: ShardSample) -> dict[str, np.ndarray]:
        """``1 H W`` arrays of one sample at ``size`` (HU; ``mask`` bool), and ``pixel_mm`` ``(1,)``. The
        last sample read is kept, so a dataset's several fields of one item open its shard once."""
        if self._last is not None and self._last[0] == sample:
            return self._last[1]
        from medistill.tasks import mar_data

        path = self.folders[sample.folder] / sample.shard
        try:
            with np.load(path) as f:
                raw = {name: f[key][sample.mask : sample.mask + 1] for key, name in ARRAYS.items()}
        except (OSError, KeyError, ValueError) as err:
            raise MedistillError(f"{path}: not a readable `simulate metal` shard ({err})") from None
        arrays = {k: v.astype(np.float32) for k, v in raw.items() if k != "mask"}
        mask = raw["mask"].astype(bool)
        if self.scale[sample.folder] != self.size:
            arrays = {k: mar_data.resample(v, self.size) for k, v in arrays.items()}
            mask = mar_data.resample(mask.astype(np.float32), self.size) > 0.3
        arrays["mask"] = mask
        arrays["pixel_mm"] = np.full(1, self.pixel_mm[sample.folder], np.float32)
        self._last = (sample, arrays)
        return arrays

    def arrays(self, samples: list[ShardSample]) -> dict[str, np.ndarray]:
        """The ``M H W`` arrays of ``samples`` in memory (the evaluation sets)."""
        if not samples:
            raise MedistillError("data.shards: the split selects no sample (too few slices per folder?)")
        read = [self.read(s) for s in samples]
        return {k: np.concatenate([r[k] for r in read]) for k in read[0]}


class ShardColumn:
    """One field of the samples (``column[i]``: a numpy array), computed from the sample when indexed:
    a lazily read stand-in for an in-memory array of :class:`medistill.tasks.mar.MARSlices`."""

    def __init__(
        self,
        folders: ShardFolders,
        samples: list[ShardSample],
        field: Callable[[dict[str, np.ndarray]], np.ndarray],
    ) -> None:
        self.folders, self.samples, self.field = folders, samples, field

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.field(self.folders.read(self.samples[int(index)]))
