"""MAR 2.5D input (``data.neighbours``): channel layout, the centre slice as the residual base, neighbour
simulation (a 3D metal object's cross-sections, edges replicated), the 2D case left exactly as it was,
and ``medistill predict`` on a small volume. Phantom and synthetic data only (no example data)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medistill.cli import main
from medistill.config import load_config
from medistill.errors import MedistillError
from medistill.tasks import mar, mar_data
from medistill.tasks.base import make_task

TINY = ["data.sources=[phantom]", "data.size=32", "data.cache=false", "train.progress=false"]


def _task(tmp_path: Path, *sets: str) -> mar.MARTask:
    return make_task(load_config("configs/mar_quick.yaml", [*TINY, *sets]), tmp_path)


def test_channels_group_each_image_input_by_slice_and_keep_one_centre_mask(tmp_path: Path) -> None:
    task = _task(tmp_path, "data.neighbours=2")
    assert task.channels() == [
        *[("artifact", o) for o in (-2, -1, 0, 1, 2)],
        *[("li", o) for o in (-2, -1, 0, 1, 2)],
        ("mask", 0),
    ]
    n, h = 3, 32
    arrays = {  # every slice and input gets its own constant value (HU) so the order can be read back
        "artifact": np.full((n, h, h), 100.0, np.float32),
        "li": np.full((n, h, h), 200.0, np.float32),
        "mask": np.ones((n, h, h), bool),
        "artifact_nb": np.stack([np.full((n, h, h), v, np.float32) for v in (10, 20, 30, 40)], 1),
        "li_nb": np.stack([np.full((n, h, h), v, np.float32) for v in (50, 60, 70, 80)], 1),
    }
    x = task.net_input(arrays)
    assert x.shape == (n, 11, h, h)
    expect = [10, 20, 100, 30, 40, 50, 60, 200, 70, 80]  # offsets -2, -1, 0, +1, +2 of artifact, then li
    assert np.allclose(x[0, :10, 0, 0] * 1000.0, expect) and np.all(x[:, 10] == 1.0)
    no_li = _task(tmp_path, "data.neighbours=1", "data.inputs=[artifact, mask]")
    assert no_li.channels() == [("artifact", -1), ("artifact", 0), ("artifact", 1), ("mask", 0)]


@pytest.mark.parametrize(("inputs", "base"), [("[artifact, li, mask]", 4), ("[artifact, mask]", 1)])
def test_residual_base_is_the_centre_slice(tmp_path: Path, inputs: str, base: int) -> None:
    """An untrained residual model returns its base channel exactly: the centre LI (or artifact)."""
    task = _task(tmp_path, "data.neighbours=1", f"data.inputs={inputs}")
    net = task.build_model("net", task.cfg.stages[1].models["net"])
    assert isinstance(net, mar.ResidualMAR) and net.base == base
    x = torch.arange(len(task.channels()), dtype=torch.float32).view(1, -1, 1, 1).expand(2, -1, 32, 32)
    assert torch.equal(net(x.contiguous()), torch.full((2, 1, 32, 32), float(base)))


def test_neighbours_zero_leaves_sets_and_inputs_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 0 the task asks mar_data for the same SetSpec (so the same cache key, the sets cached before stay
    in use), adds nothing to its arrays and stacks the inputs exactly as the 2D code did; at 1 the centre
    arrays are that same 2D set."""
    specs: list[mar_data.SetSpec] = []
    real = mar_data.simulated_set

    def spy(spec: mar_data.SetSpec, cache_dir: Path | None, progress: bool = True) -> dict[str, np.ndarray]:
        specs.append(spec)
        return real(spec, cache_dir, progress)

    monkeypatch.setattr(mar_data, "simulated_set", spy)
    flat = _task(tmp_path, "data.max_eval_slices=2", "data.masks_per_slice=1")
    arrays = flat.sim_set("sim", "val")
    slices = tuple(flat.slice_split()["val"])
    assert specs[-1] == mar_data.SetSpec("sim", slices, 32, 1, 0, False)
    assert set(arrays) == {"artifact", "li", "free", "clean", "mask", "pixel_mm"}
    lo, hi = flat.cfg.data.clip_hu
    before = np.stack(  # the 2D net_input, verbatim
        [
            arrays["mask"].astype(np.float32) if k == "mask" else np.clip(arrays[k], lo, hi) / 1000.0
            for k in flat.cfg.data.inputs
        ],
        1,
    ).astype(np.float32)
    assert np.array_equal(flat.net_input(arrays), before)

    deep = _task(tmp_path, "data.max_eval_slices=2", "data.masks_per_slice=1", "data.neighbours=1")
    arrays25 = deep.sim_set("sim", "val")
    assert specs[-1] == specs[0]
    key = mar.NeighbourSpec(specs[0], 1).key()
    assert key.startswith(specs[0].key() + "_nb1_") and key != mar.NeighbourSpec(specs[0], 2).key()
    assert all(np.array_equal(arrays25[k], v) for k, v in arrays.items())
    x = deep.net_input(arrays25)
    assert np.array_equal(x[:, [1, 4, 6]], before)  # the centre channels are the 2D inputs
    assert arrays25["artifact_nb"].shape == (len(slices), 2, 32, 32)


def test_neighbour_mask_is_a_3d_object_cross_section() -> None:
    mask = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    mask |= (yy - 12) ** 2 + (xx - 12) ** 2 <= 36  # a disc, radius 6 px
    mask[28:30, 25:35] = True  # a thin bar, 2 px
    px = 0.5
    same = mar.neighbour_mask(mask, 2.0, 3.0, px)
    assert np.array_equal(same, mask)  # within the straight part
    sizes = [mar.neighbour_mask(mask, 3.0 + t, 3.0, px).sum() for t in (0.2, 0.6, 1.5, 2.0, 2.5)]
    assert all(a >= b for a, b in zip(sizes, sizes[1:], strict=False)) and sizes[0] > sizes[-1] > 0
    cut = mar.neighbour_mask(mask, 3.0 + 1.0, 3.0, px)
    assert (cut <= mask).all() and not cut[28:30].any() and cut[:20, :20].sum() > 60  # the bar ends first
    assert not mar.neighbour_mask(mask, 3.0 + 3.0, 3.0, px).any()  # beyond the disc's radius (2.8 mm)
    assert mar.neighbour_index(0, 2, 5) == [0, 0, 1, 2] and mar.neighbour_index(4, 1, 5) == [3, 4]


def test_simulated_neighbours_replicate_the_edge_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-slice synthetic volume (under a real source's name): slice 0's lower neighbour is slice 0
    itself (its very images), its upper one a fresh scan of slice 1 with the object's cross-section."""
    size = 32
    axis = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    vol = np.full((3, size, size), -1000.0, np.float32)
    for z in range(3):
        vol[z][xx**2 + yy**2 < 0.7**2] = 40.0
        vol[z][(xx - 0.2 - 0.05 * z) ** 2 + yy**2 < 0.2**2] = 900.0  # a bone that moves along z
    monkeypatch.setattr(mar_data, "load_source", lambda name: (vol.copy(), 4.0))
    monkeypatch.setattr(mar, "slice_mm", lambda name: 3.0)
    spec = mar_data.SetSpec("sim", (("chest-ct", 0), ("chest-ct", 1)), size, 2, 0, False)
    centre = mar_data.simulated_set(spec, None, progress=False)
    nb = mar._simulate_neighbours(mar.NeighbourSpec(spec, 1), centre, progress=False)
    assert nb["artifact_nb"].shape == (4, 2, size, size) and nb["mask_nb"].dtype == bool
    for j in (0, 1):  # slice 0, both masks: offset -1 is the edge, replicated
        assert np.array_equal(nb["artifact_nb"][j, 0], centre["artifact"][j])
        assert np.array_equal(nb["li_nb"][j, 0], centre["li"][j])
        assert not np.array_equal(nb["artifact_nb"][j, 1], centre["artifact"][j])
    assert not np.array_equal(nb["artifact_nb"][2, 0], nb["artifact_nb"][2, 1])  # slice 1: both simulated
    assert (nb["mask_nb"] <= centre["mask"][:, None]).all()  # cross-sections never grow
    clean = ~nb["mask_nb"].reshape(4, 2, -1).any(-1)
    assert np.array_equal(nb["li_nb"][clean], nb["artifact_nb"][clean])  # no metal left: LI = the image
    bad = dict(centre, mask=np.roll(centre["mask"], 1, axis=0))  # a set that does not match the replay
    with pytest.raises(MedistillError, match="drew other masks"):
        mar._simulate_neighbours(mar.NeighbourSpec(spec, 1), bad, progress=False)


class _Probe(nn.Module):
    """Returns the centre LI channel and records what the network was given."""

    def __init__(self, base: int) -> None:
        super().__init__()
        self.base, self.seen = base, []
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x[:, self.base : self.base + 1] + self.w


def _volume() -> np.ndarray:
    """``S H W`` axial slices: a water disc, metal in slices 0 (the edge), 2 and 3."""
    axis = np.arange(48) - 23.5
    body = np.hypot(axis[:, None], axis[None, :]) < 20
    slices = np.where(body, 40.0, -1000.0)[None].repeat(6, 0).astype(np.float32)
    slices += np.arange(6, dtype=np.float32)[:, None, None] * 10.0 * body  # every slice its own HU
    for z in (0, 2, 3):
        slices[z, 22:25, 20 + z : 23 + z] = 3500.0
    return slices


def test_predict_feeds_the_volume_neighbours_and_replicates_edges(tmp_path: Path) -> None:
    task = _task(tmp_path, "data.neighbours=1")
    probe = _Probe(task.channels().index(("li", 0)))
    slices = _volume()
    out, n = task.correct_slices(probe, slices, 2.0)
    assert n == 3 and len(probe.seen) == 3
    small = np.clip(mar_data.resample(slices, 32), -1024.0, 3071.0) / 1000.0  # as net_input clips
    edge, mid = probe.seen[0][0].numpy(), probe.seen[1][0].numpy()  # slices 0 and 2
    assert np.array_equal(edge[0], edge[1]) and np.array_equal(edge[3], edge[4])  # z-1 := z at the edge
    assert np.allclose(edge[2], small[1], atol=1e-6)  # artifact of slice 1
    assert np.allclose(mid[0], small[1], atol=1e-6) and np.allclose(mid[2], small[3], atol=1e-6)
    assert np.array_equal(mid[3], mid[0])  # slice 1 holds no metal: its LI is its image
    assert not np.array_equal(mid[5], mid[2])  # slice 3 holds metal: its own LI
    assert np.array_equal(out[[1, 4, 5]], slices[[1, 4, 5]])
    one = _Probe(probe.base)
    task.correct_slices(one, slices[2:3], 2.0)  # a lone 2D slice is its own neighbours
    x = one.seen[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], x[1]) and torch.equal(x[3], x[4])


CONFIG = """
name: mar-25d-tiny
task: mar
seed: 0
data: {sources: [phantom], size: 32, cache: false, slab: 4, max_train_slices: 3, max_eval_slices: 1,
       masks_per_slice: 1, neighbours: 1, domain: sim}
train: {steps: 2, batch_size: 2, val_every: 2, log_every: 1, checkpoint_every: 2, progress: false}
stages:
  - name: teacher
    models:
      net: {name: unet, args: {features: [4, 8], act: elu, upsample: nearest, head_kernel_size: 3}}
    losses:
      rec: {name: l1}
"""


def test_predict_cli_with_a_25d_model_keeps_geometry_and_clean_slices(tmp_path: Path) -> None:
    cfg, run = tmp_path / "tiny.yaml", tmp_path / "run"
    cfg.write_text(CONFIG)
    main(["train", str(cfg), "--out", str(run)])
    vol = np.transpose(_volume(), (1, 2, 0))  # RAS: slices along the last axis
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    src, dst = tmp_path / "ct.nii.gz", tmp_path / "mar.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), src)
    main(["predict", str(run), str(src), "--out", str(dst)])
    out = nib.load(dst)
    arr = np.asarray(out.dataobj)
    assert arr.shape == vol.shape and np.allclose(out.affine, affine)
    assert np.array_equal(arr[..., [1, 4, 5]], vol[..., [1, 4, 5]])  # clean slices bit-identical
    metal = vol > 2500
    assert np.array_equal(arr[metal], vol[metal])  # metal pixels kept
    assert all(not np.array_equal(arr[..., z], vol[..., z]) for z in (0, 2, 3))
