"""ANTs SyN and elastix B-spline as classical peers of medistill's registration, on the very test pairs
(and with the very metrics) of ``medistill evaluate``: the synthetic chest-ct cohort with known fields.

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 .venv-bench/bin/python benchmarks/registration_peers.py \
        --config runs/reg_quick/config.yaml --size 48 --pairs 6 --size 128 --pairs 2

Peers are benchmark-only (``benchmarks/requirements-registration.txt``, in ``.venv-bench``). Each tool
registers the network-grid images (unit spacing, identity direction, ITK index k = tensor axis k, so a
physical displacement is one in voxels); its result is converted to medistill's convention (``u`` in
voxels, ``warped(x) = moving(x + u(x))``) and checked on the first pair: warping the moving labels by
the converted field reproduces the tool's own nearest-neighbour warp of them (Dice > 0.95, asserted).
Scored by ``score_test_pair``, as in ``RegistrationTask.evaluate``: Dice of warped labels (with HD95),
TRE (mm) against the known field inside the body (fixed > 0.05), % det J <= 0, SD log J; and seconds
per pair (registration and field conversion) after one warm-up. The load average is recorded: on a
shared machine times are upper bounds.
"""

from __future__ import annotations

import os

THREADS = os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")  # before ITK / ANTs load

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medistill.config import load_config  # noqa: E402
from medistill.nets.registration import SpatialTransformer  # noqa: E402
from medistill.tasks.base import make_task  # noqa: E402
from medistill.tasks.registration import mean_dice, score_test_pair, sitk_bspline  # noqa: E402

#: a registration: fixed, moving (``1 1 S S S``) -> (displacement ``1 3 S S S`` in voxels, a function that
#: warps a label map ``S S S`` with the tool's own nearest-neighbour resampling)
Peer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Callable[[np.ndarray], np.ndarray]]]


def ants_syn(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """ANTs SyN (``type_of_transform="SyN"``: affine then SyN, antspyx defaults); the forward transforms
    (fixed -> moving points) composed into one displacement field on the fixed grid."""
    import ants

    # ANTsPy's numpy arrays are in ITK index order: tensor axis k = ITK axis k, spacing 1, origin 0
    f = ants.from_numpy(fixed[0, 0].numpy().astype(np.float32))
    m = ants.from_numpy(moving[0, 0].numpy().astype(np.float32))
    reg = ants.registration(f, m, type_of_transform="SyN")
    with tempfile.TemporaryDirectory() as tmp:
        path = ants.apply_transforms(f, m, reg["fwdtransforms"], compose=f"{tmp}/c")
        field = ants.image_read(path).numpy()  # X Y Z 3, physical = voxel displacement
        u = torch.from_numpy(np.moveaxis(field, -1, 0).astype(np.float32).copy())[None]

    def own_warp(labels: np.ndarray) -> np.ndarray:
        lab = ants.from_numpy(labels.astype(np.float32))
        return ants.apply_transforms(f, lab, reg["fwdtransforms"], interpolator="nearestNeighbor").numpy()

    return u, own_warp


def elastix_bspline(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, Callable]:
    """elastix with its default B-spline parameter map (4 levels, final grid 16 voxels, advanced Mattes
    MI, adaptive stochastic gradient descent); the deformation field from transformix."""
    import itk

    # itk's numpy view is (z, y, x) like SimpleITK's: the transposed array has ITK axis k = tensor axis k
    image = lambda t: itk.image_from_array(np.ascontiguousarray(t.numpy().transpose(2, 1, 0), np.float32))  # noqa: E731
    f, m = image(fixed[0, 0]), image(moving[0, 0])
    params = itk.ParameterObject.New()
    bspline = params.GetDefaultParameterMap("bspline")
    # threads: ITK's global default (ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS) and elastix's own cap;
    # `number_of_threads=` / SetNumberOfThreads segfaults in itk-elastix 0.25.4
    bspline["MaximumNumberOfThreads"] = [THREADS]
    params.AddParameterMap(bspline)
    _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False)
    # z y x 3, components along ITK x, y, z
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes deformationField.nii there
        field = itk.array_from_image(itk.transformix_deformation_field(m, result, output_directory=tmp))
    u = torch.from_numpy(field.transpose(3, 2, 1, 0).astype(np.float32).copy())[None]

    def own_warp(labels: np.ndarray) -> np.ndarray:
        nearest = itk.ParameterObject.New()
        for k in range(result.GetNumberOfParameterMaps()):
            pm = result.GetParameterMap(k)
            pm["FinalBSplineInterpolationOrder"] = ["0"]
            nearest.AddParameterMap(pm)
        out = itk.transformix_filter(image(torch.from_numpy(labels.astype(np.float32))), nearest)
        return itk.array_from_image(out).transpose(2, 1, 0)

    return u, own_warp


PEERS: dict[str, Peer] = {"ants_syn": ants_syn, "elastix_bspline": elastix_bspline}


def check_convention(name: str, peer: Peer, pair: dict[str, torch.Tensor], values: list[int]) -> float:
    """Dice between the tool's own nearest warp of the moving labels and medistill's nearest warp of them by
    the converted field; a wrong sign, axis order or unit scores far below 0.95."""
    u, own_warp = peer(pair["fixed"][None], pair["moving"][None])
    ours = SpatialTransformer("nearest", "zeros")(pair["moving_labels"][None].float(), u).round().long()
    theirs = torch.from_numpy(np.rint(own_warp(pair["moving_labels"][0].numpy())).astype(np.int64))
    dice = mean_dice(ours, theirs[None, None], values)
    assert dice > 0.95, f"{name}: converted field disagrees with the tool's own warp (Dice {dice:.3f})"
    return dice


def instance_optimisation(task: Any, steps: int) -> Peer:
    """medistill's ``refine`` from a zero field (no network): the first stage's loss (the quick preset's
    teacher: Pearson + gradient smoothness) optimised for ``steps`` Adam steps on the correction grid of
    the config's ``refine`` (its lr and grid). What the instance optimisation costs and reaches by itself
    at this size; after a network it starts from that network's field instead."""
    from medistill.tasks.registration_refine import refine_displacement, stage_objective

    cfg = task.cfg.refine.model_copy(update={"steps": steps})
    stage = task.cfg.stages[0].name

    def run(fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, None]:
        zero = torch.zeros(1, 3, *fixed.shape[2:])
        return refine_displacement(fixed, moving, zero, stage_objective(task, stage), cfg), None

    return run


def score(task: Any, peers: dict[str, Peer], n_pairs: int, sitk: bool = True) -> dict[str, Any]:
    """Every peer (and SimpleITK, the baseline of ``evaluate``) on the first ``n_pairs`` test pairs of the
    task, scored as ``RegistrationTask.evaluate`` scores them."""
    c, d = task.cohort(), task.cfg.data
    test = task.pair_set("test", limit=n_pairs)
    labels = {name: k for k, name in enumerate(c["structures"], start=1)}
    spacing = c["spacing"]
    methods: dict[str, Peer] = dict(peers)
    if sitk:
        methods["sitk_bspline"] = lambda f, m: (sitk_bspline(f, m, d.sitk_iterations, d.threads), None)
    ours = {name: fn for name, fn in methods.items() if name.startswith("medistill")}
    rows: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        check = None
        if name in peers and name not in ours:
            check = check_convention(name, fn, test[0], list(labels.values()))
            print(f"  {name}: converted field vs the tool's own label warp, Dice {check:.3f}", flush=True)
        else:
            fn(test[0]["fixed"][None], test[0]["moving"][None])  # warm-up
        per: dict[str, list[float]] = {
            k: [] for k in ("dice", "hd95_mm", "tre_mm", "folding_percent", "sd_log_jacobian", "seconds")
        }
        load = []
        for k in range(len(test)):
            b = test[k]
            f, m = b["fixed"][None], b["moving"][None]
            load.append(os.getloadavg()[0])
            t0 = time.perf_counter()
            u = fn(f, m)[0].float()
            per["seconds"].append(time.perf_counter() - t0)
            for key, value in score_test_pair(test, k, u, labels, spacing).items():
                per[key].append(value)
            i, j = test.pairs[k]
            print(
                f"  {name} pair {k} ({i}, {j}): Dice {per['dice'][-1]:.3f}, TRE {per['tre_mm'][-1]:.2f} mm, "
                f"{per['seconds'][-1]:.1f} s",
                flush=True,
            )
        rows[name] = {key: float(np.mean(v)) for key, v in per.items()}
        rows[name] |= {f"{key}_sd": float(np.std(v)) for key, v in per.items()}
        rows[name] |= {
            "n_pairs": len(test),
            "load_avg_1min": [min(load), max(load)],
            "convention_dice": check,
        }
    return {"size": d.size, "pairs": [list(p) for p in test.pairs], "spacing_mm": list(spacing), "rows": rows}


def score_real(task: Any, peers: dict[str, Peer], sitk: bool = True) -> dict[str, Any]:
    """Every peer on the config's real pairs, as ``RegistrationTask.evaluate_real`` scores the networks:
    the same shared pre-alignment, the fixed image's network grid, Dice per structure (a missed one 0)."""
    from medistill.report.html import markdown_table
    from medistill.tasks.registration_real import evaluate_real_pairs, real_pairs_table

    d = task.cfg.data
    methods = {name: (lambda f, m, fn=fn: fn(f, m)[0]) for name, fn in peers.items()}
    if sitk:
        methods["sitk_bspline"] = lambda f, m: sitk_bspline(f, m, d.sitk_iterations, d.threads)
    load = os.getloadavg()[0]
    real, aligned = evaluate_real_pairs(
        task.cfg.eval.real_pairs, methods, d.size, task.modality, d.hu_window, d.threads
    )
    table = real_pairs_table(real, aligned[0]["structures"])
    print(markdown_table(table), flush=True)
    return {"pairs": real, "load_avg_1min": [load, os.getloadavg()[0]]}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table(result: dict[str, Any]) -> str:
    n = next(iter(result["rows"].values()))["n_pairs"]
    lines = [
        f"{result['size']}^3, n={n} test pairs, mean +- SD over pairs",
        "| method | Dice | HD95 mm | TRE mm | % det J <= 0 | SD log J | s / pair | load (1 min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lo, hi = r["load_avg_1min"]
        lines.append(
            f"| {name} | {r['dice']:.3f} +- {r['dice_sd']:.3f} | {r['hd95_mm']:.1f} +- {r['hd95_mm_sd']:.1f} "
            f"| {r['tre_mm']:.2f} +- {r['tre_mm_sd']:.2f} | {r['folding_percent']:.3f} | "
            f"{r['sd_log_jacobian']:.3f} | {r['seconds']:.2f} +- {r['seconds_sd']:.2f} | {lo:.1f}-{hi:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="runs/reg_quick/config.yaml", help="a run's config.yaml or a preset")
    ap.add_argument("--size", type=int, action="append", help="network grid size (repeatable)")
    ap.add_argument("--pairs", type=int, action="append", help="test pairs for each --size")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--io-steps", type=int, default=0, help="also medistill's instance optimisation alone")
    ap.add_argument(
        "--no-sitk", action="store_true", help="skip the SimpleITK baseline (174 s per 128^3 pair)"
    )
    ap.add_argument(
        "--real",
        action="store_true",
        help="also the config's eval.real_pairs (after its shared pre-alignment)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/registration_peers.json"))
    a = ap.parse_args()
    sizes, pairs = a.size or [48], a.pairs or [6]
    if len(pairs) != len(sizes):
        ap.error("give one --pairs per --size")
    torch.set_num_threads(int(THREADS))
    peers = {k: PEERS[k] for k in a.peers.split(",") if k}
    out: dict[str, Any] = {
        "config": a.config,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": int(THREADS),
        "load_avg_start": os.getloadavg(),
        "versions": {},
        "results": [],
    }
    from importlib.metadata import version

    for pkg in ("antspyx", "itk-elastix", "SimpleITK", "torch"):
        out["versions"][pkg] = version(pkg)
    for size, n in zip(sizes, pairs, strict=True):
        cfg = load_config(a.config, [f"data.size={size}", f"data.threads={THREADS}"])
        task = make_task(cfg, Path(tempfile.mkdtemp()))  # read-only use: the cohort, no run folder
        print(f"{size}^3: {n} pairs", flush=True)
        mine = dict(peers)
        if a.io_steps:
            mine[f"medistill_io_{a.io_steps} (zero start)"] = instance_optimisation(task, a.io_steps)
        out["results"].append(score(task, mine, n, sitk=not a.no_sitk) if n else {"size": size, "rows": {}})
        if a.real and task.cfg.eval.real_pairs:
            out["results"][-1]["real_pairs"] = score_real(task, mine, sitk=not a.no_sitk)
        out["load_avg_end"] = os.getloadavg()
        a.out.write_text(json.dumps(out, indent=2) + "\n")
        if n:
            print(table(out["results"][-1]), flush=True)
    print(
        f"CPU {out['cpu']} ({out['cores']} cores), {THREADS} threads, load average start "
        f"{out['load_avg_start'][0]:.2f}, end {out['load_avg_end'][0]:.2f}; {a.out}"
    )


if __name__ == "__main__":
    main()
