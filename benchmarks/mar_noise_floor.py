"""The noise floor of the MAR target: how far any correction can get on the simulated test slices.

    python benchmarks/mar_noise_floor.py [CONFIG] [--every 3]

The target of every MAR pair is the metal-free scan through the same noisy chain, so even a perfect
correction differs from it by the target's own noise. For every ``--every``-th test slice of CONFIG
(default configs/mar_quick.yaml) the metal-free scan of the in-domain (``sim``) and shifted
(``clinical``) simulators is drawn twice with independent noise; SD(a - b) / sqrt(2) inside the field of
view (metal excluded) is the target's noise SD: the lowest RMSE any method can score.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml

from medistill.config import validate_config
from medistill.physics import metal
from medistill.runs import make_task
from medistill.tasks import mar_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, nargs="?", default=Path("configs/mar_quick.yaml"))
    parser.add_argument("--every", type=int, default=3)
    args = parser.parse_args()
    cfg = validate_config(yaml.safe_load(args.config.read_text()), str(args.config))
    task = make_task(cfg, Path("runs") / "mar_noise_floor")
    size = cfg.data.size
    axis = np.arange(size) - (size - 1) / 2
    fov = np.hypot(axis[:, None], axis[None, :]) <= size / 2 - 1
    for domain in ("sim", "clinical"):
        scan_d = mar_data.SCANS[domain]
        sds = []
        for src, z in task.slice_split()["test"][:: args.every]:
            volume, px = mar_data.load_source(src)
            pixel_mm = px * volume.shape[-1] / size
            hu = torch.from_numpy(mar_data.resample(volume[z : z + 1], size))
            rng = np.random.default_rng(
                [cfg.seed, mar_data.SOURCES.index(src), z, mar_data.DOMAINS.index(domain)]
            )
            mask = mar_data.place_metal(hu[0].numpy(), pixel_mm, src, rng, scan_d.kinds == "realistic")
            photons = float(np.exp(rng.uniform(*np.log(scan_d.photons))))
            scan = metal.MetalScan(
                metal=scan_d.metals[0],
                kvp=scan_d.kvp,
                photons=photons,
                scatter_photons=scan_d.scatter_photons,
                filter_name=scan_d.filter_name,
            )
            geometry = mar_data.mar_geometry(size, pixel_mm)
            a, b = (
                mar_data.simulate_domain(
                    hu,
                    torch.from_numpy(mask[None]),
                    geometry,
                    scan,
                    scan_d.blur_bins,
                    torch.Generator().manual_seed(s),
                )["free_hu"][0].numpy()
                for s in (1, 2)
            )
            keep = fov & ~mask
            sds.append(float(np.sqrt(((a - b)[keep] ** 2).mean() / 2)))
        print(
            f"{domain}: target noise SD in the FOV, n = {len(sds)} test slices: mean {np.mean(sds):.1f} HU "
            f"(min {min(sds):.1f}, max {max(sds):.1f})"
        )


if __name__ == "__main__":
    main()
