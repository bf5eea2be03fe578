"""2D lung segmentation on axial CT slices: the first task through the whole medistill path.

Data: one labelled CT (by default the ``chest-ct`` example; lung lobes 10-14 merged into one lung
label) or the user's own CT + label map. A single volume is not a cohort, so the split is by slabs
of consecutive axial slices (train / val / test slabs interleaved along z, the first slice of every
slab dropped as a gap); every table says so. Slices are cut from the affine in one canonical in-plane
orientation (:mod:`medistill.io.axial`: rows anterior -> posterior, columns patient right -> left)
before the network, in training and in prediction, and predictions are put back in the input's array
order after it, so the same CT stored RAS, LPS, PRS, ... gives the same mask. Slices are clipped to a HU
window, scaled to [0, 1] and resampled in-plane to ``data.size`` (area averaging; labels by area
fraction >= 0.5, never by interpolating label values). Predictions are made at that size and resampled
back to the input grid, so the written NIfTI overlays the CT in any viewer.

Baseline: "air inside the body" (HU < -400 within the filled body outline), the classical
threshold segmentation of lungs, evaluated on the same test slices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from scipy import ndimage

from medistill.config import ExperimentConfig, ModelSpec, StrictModel
from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.io.axial import AxialSlices, axial_axis, axial_slices, from_axial
from medistill.io.images import Image, check_same_grid, read_image, write_image
from medistill.metrics.segmentation import dice
from medistill.registry import TASKS
from medistill.tasks.base import Task, require_divisible
from medistill.tasks.steps import supervised_step

SPLITS = ("train", "train", "val", "train", "test")  # slab pattern along z


class LungData(StrictModel):
    example: str | None = Field("chest-ct", description="example set providing cxr.nii.gz + mask.nii.gz")
    image: Path | None = Field(None, description="CT volume (used instead of `example`)")
    label: Path | None = Field(None, description="label map on the CT's grid")
    label_ids: list[int] = Field(
        [10, 11, 12, 13, 14], min_length=1, description="label values merged into lung"
    )
    size: int = Field(128, ge=16, description="in-plane size slices are resampled to (multiple of 8)")
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    slab: int = Field(8, ge=2, description="slices per slab in the slab split")


class Lung2DConfig(ExperimentConfig):
    task: str = "lung2d"
    data: LungData = LungData()


def normalise(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resize_slices(x: np.ndarray, size: int) -> np.ndarray:
    """``(N, H, W)`` float -> ``(N, size, size)`` by area averaging (anti-aliased downsampling)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    mode = "area" if size <= min(x.shape[1:]) else "bilinear"
    return F.interpolate(t, size=(size, size), mode=mode).squeeze(1).numpy()


def air_in_body_baseline(hu_slice: np.ndarray) -> np.ndarray:
    """Classical lung mask: air (HU < -400) inside the filled body outline of a 2D slice."""
    body = ndimage.binary_fill_holes(hu_slice > -500)
    labels, n = ndimage.label(body)
    if n:
        sizes = ndimage.sum(body, labels, range(1, n + 1))
        body = labels == (1 + int(np.argmax(sizes)))
        body = ndimage.binary_fill_holes(body)
    return body & (hu_slice < -400)


def slab_split(n: int, slab: int) -> dict[str, np.ndarray]:
    """Indices of the train/val/test slices of an ``n``-slice stack (slab pattern, one-slice gaps)."""
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for z in range(n):
        s, pos = divmod(z, slab)
        if pos == 0 and s > 0:  # gap between slabs
            continue
        out[SPLITS[s % len(SPLITS)]].append(z)
    return {k: np.asarray(v, dtype=int) for k, v in out.items()}


class SliceSet(KeyedDataset):
    """Axial slices ``(1, S, S)`` in [0, 1] with lung masks; training adds flips and intensity jitter."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, augment: bool) -> None:
        self.images, self.masks, self.augment = images, masks, augment

    def __len__(self) -> int:
        return len(self.images)

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        img, msk = self.images[index], self.masks[index]
        if self.augment and rng is not None:
            if rng.random() < 0.5:
                img, msk = img[:, ::-1], msk[:, ::-1]
            gamma = float(np.exp(rng.normal(0, 0.15)))
            img = np.clip(img, 0, 1) ** gamma * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, img.shape)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None],
            "label": torch.from_numpy(np.ascontiguousarray(msk, dtype=np.int64))[None],
        }


@TASKS.register("lung2d")
class Lung2DTask(Task):
    """Binary lung segmentation of axial CT slices with a 2D U-Net."""

    Config = Lung2DConfig
    val_metric = "dice"
    val_mode = "max"

    def __init__(self, cfg: Lung2DConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: Lung2DConfig = cfg
        self._volume: tuple[Image, Image] | None = None

    # --- data ------------------------------------------------------------------------------------
    def source_files(self) -> tuple[Path, Path]:
        d = self.cfg.data
        if d.image is not None:
            if d.label is None:
                raise MedistillError("data.image is set but data.label is not; training needs both")
            return Path(d.image), Path(d.label)
        if d.example is None:
            raise MedistillError("set data.example (e.g. chest-ct) or data.image + data.label")
        from medistill.io.examples import example_file

        return example_file(d.example, "cxr.nii.gz"), example_file(d.example, "mask.nii.gz")

    def volume(self) -> tuple[Image, Image]:
        """The CT (HU) and its binary lung mask, validated (3D, same grid, lung present)."""
        if self._volume is None:
            img_path, lab_path = self.source_files()
            ct, lab = read_image(img_path), read_image(lab_path)
            if ct.ndim != 3:
                raise MedistillError(f"{img_path}: expected a 3D CT volume, got shape {ct.shape}")
            check_same_grid(ct, lab, str(img_path), str(lab_path))
            lung = np.isin(np.rint(lab.array).astype(np.int64), self.cfg.data.label_ids)
            if not lung.any():
                raise MedistillError(f"{lab_path}: none of the label values {self.cfg.data.label_ids} occur")
            self._volume = (ct, lab.with_array(lung.astype(np.uint8)))
        return self._volume

    def slices(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Full-resolution HU slices and lung masks in the canonical orientation, and the slab split."""
        ct, lung = self.volume()
        hu, masks = axial_slices(ct.array, ct.affine).slices, axial_slices(lung.array, lung.affine).slices
        return hu, masks, slab_split(len(hu), self.cfg.data.slab)

    def build_data(self) -> tuple[SliceSet, SliceSet]:
        d = self.cfg.data
        hu, masks, split = self.slices()
        x = resize_slices(normalise(hu, d.hu_window), d.size)
        y = resize_slices(masks.astype(np.float32), d.size) >= 0.5
        return (
            SliceSet(x[split["train"]], y[split["train"]], augment=True),
            SliceSet(x[split["val"]], y[split["val"]], augment=False),
        )

    def splits(self) -> dict[str, list[str]]:
        """Slice ids ``<case>:z<index>`` of each slab split (one volume: the split is by slabs)."""
        _, _, split = self.slices()
        return {k: [f"{self.case_name}:z{int(z):04d}" for z in v] for k, v in split.items()}

    @property
    def case_name(self) -> str:
        return self.cfg.data.example if self.cfg.data.image is None else Path(self.cfg.data.image).name

    # --- model and steps -------------------------------------------------------------------------
    def net_args(self, key: str, spec: ModelSpec, probe: bool = False) -> dict[str, Any]:
        return {"spatial_dims": 2, "in_channels": 1, "out_channels": 2}

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> torch.nn.Module:
        net = super().build_model(key, spec, probe)
        require_divisible(net, (self.cfg.data.size,) * 2, "data.size", spec.name)
        return net

    def deploy_inputs(self, stage: str, model: str) -> dict[str, torch.Tensor]:
        """A real validation slice at the model's size."""
        _, val = self.build_data()
        return {"image": val[len(val) // 2]["image"][None]}

    def whole_input(self, stage: str, model: str) -> tuple[str, dict[str, torch.Tensor]]:
        hu, _, split = self.slices()
        x = resize_slices(normalise(hu[split["test"]], self.cfg.data.hu_window), self.cfg.data.size)
        return f"{len(x)} test slices of {self.case_name} at {self.cfg.data.size}^2", {
            "image": torch.from_numpy(x)[:, None]
        }

    def training_step(self, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        return supervised_step(ctx, batch["image"], batch["label"])

    def validate(self, ctx: Any, loader: Any) -> dict[str, float]:
        preds, truths = [], []
        for batch in loader:
            preds.append(ctx.models["net"](batch["image"].to(ctx.device)).argmax(1).cpu())
            truths.append(batch["label"][:, 0])
        return {"dice": dice(torch.cat(preds), torch.cat(truths))}

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_slices(self, net: torch.nn.Module, hu: np.ndarray, batch: int = 16) -> np.ndarray:
        """``(N, H, W)`` HU slices -> lung probability ``(N, H, W)`` at the input resolution."""
        d = self.cfg.data
        net.eval()
        device = next(net.parameters()).device
        x = resize_slices(normalise(hu, d.hu_window), d.size)
        out = []
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i : i + batch])[:, None].to(device)
            prob = torch.softmax(net(xb), 1)[:, 1:2]
            out.append(
                F.interpolate(prob, size=hu.shape[1:], mode="bilinear", align_corners=False)[:, 0].cpu()
            )
        return torch.cat(out).numpy()

    def predict_file(self, src: Path, dst: Path) -> Path:
        """Segment a CT volume (or one axial slice) by the last deployable stage's network and write a uint8
        mask in the input's geometry. Slices go through the canonical orientation and back (see the
        module docstring); a 2D slice without patient orientation (identity direction: PNG, TIFF) is
        taken as displayed radiologically (anterior up, patient right on the left)."""
        img = read_image(src)
        if img.ndim not in (2, 3):
            raise MedistillError(f"{src}: expected a 2D slice or a 3D CT volume, got shape {img.shape}")
        net = self.predict_model()
        if img.ndim == 2 and np.allclose(img.direction, np.eye(3)):
            mask = self.predict_slices(net, img.array[None])[0] >= 0.5
        else:
            axial = self.canonical(img, src)
            mask = from_axial(self.predict_slices(net, axial.slices) >= 0.5, axial)
            mask = mask[..., 0] if img.ndim == 2 else mask
        write_image(img.with_array(mask.astype(np.uint8)), dst)
        return dst

    @staticmethod
    def canonical(img: Image, src: Path | str) -> AxialSlices:
        """``img``'s axial slices in the canonical orientation (a 2D slice as a one-slice stack)."""
        array = img.array[..., None] if img.ndim == 2 else img.array
        if img.ndim == 2 and axial_axis(img.affine) != 2:
            raise MedistillError(f"{src}: a 2D slice that is not axial (its normal is not head-foot)")
        return axial_slices(array, img.affine)

    def deploy_contract(self, stage: str, model: str) -> dict[str, Any]:
        """Slice orientation, HU window and scaling, input size, labels and the mask threshold."""
        d = self.cfg.data
        return super().deploy_contract(stage, model) | {
            "input": "one channel: axial CT slices B 1 H W in HU",
            "orientation": "rows anterior -> posterior, columns patient right -> left (from the affine; "
            "medistill.io.axial)",
            "normalisation": {
                "scheme": "hu_window",
                "hu_window": list(d.hu_window),
                "scale": "(clip - lo) / (hi - lo)",
            },
            "size": [d.size, d.size],
            "resize": "area averaging to size, probabilities bilinear back to the slice grid",
            "output": "logits B 2 H W; softmax channel 1 = lung probability",
            "labels": {"0": {"name": "background", "value": 0}, "1": {"name": "lung", "value": 1}},
            "threshold": 0.5,
        }

    def evaluate(self, out_dir: Path) -> dict[str, Any]:
        """Dice on the test slabs at full resolution for each trained stage, next to the air-in-body
        threshold baseline. Writes an overlay figure of test slices (last stage) into ``out_dir``."""
        from medistill.report.figures import overlay_grid

        hu, masks, split = self.slices()
        idx = split["test"]
        stages = self.stage_names()
        if not stages:
            raise MedistillError(f"{self.run_dir}: no trained stage (run `medistill train` first)")
        preds = {st: self.predict_slices(self.stage_model(st), hu[idx]) >= 0.5 for st in stages}
        pred = preds[stages[-1]]
        base = np.stack([air_in_body_baseline(s) for s in hu[idx]])
        case = self.case_name
        lung_rows = np.flatnonzero(masks[idx].reshape(len(idx), -1).sum(1) > 0)
        show = lung_rows[np.linspace(0, len(lung_rows) - 1, 3).astype(int)] if len(lung_rows) else [0]
        # canonical slices are already in the radiological view (anterior up, patient right on the left)
        fig = overlay_grid(
            [hu[idx][i] for i in show],
            [masks[idx][i] for i in show],
            [pred[i] for i in show],
            Path(out_dir) / "overlay.png",
            titles=[f"test slice z={idx[i]}" for i in show],
            window=(-1000.0, 400.0),
        )
        row = {f"dice_{st}" if len(stages) > 1 else "dice": dice(p, masks[idx]) for st, p in preds.items()}
        return {
            "cases": {
                case: row
                | {"dice_baseline_air_threshold": dice(base, masks[idx]), "test_slices": int(len(idx))}
            },
            "note": "slab split of one volume (train/val/test slabs of consecutive axial slices)",
            "figures": [str(fig)],
        }
