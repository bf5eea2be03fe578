"""Cost of a network on CPU, measured: parameters, FLOPs, and latency in PyTorch and onnxruntime.

FLOPs do not predict CPU latency (DESIGN.md), so both are reported side by side: FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; norms, activations and
interpolation are not counted), latency as the median wall time of repeated runs after warm-up, with
PyTorch and onnxruntime given the same number of intra-op threads, after a warm-up, min and median of at
least 5 repeats; speed-ups compare the best backend of one network with the best backend of the other.
A whole case is run as deployed (a plain call on a whole image, or MONAI's Gaussian-weighted sliding
window over a volume with either backend as the predictor).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch.utils.flop_counter import FlopCounterMode

from medistill.deploy.export import Inputs, as_inputs, export_onnx, onnx_session
from medistill.nets.blocks import count_parameters

Predictor = Callable[[torch.Tensor], torch.Tensor]
NamedPredictor = Callable[[Inputs], torch.Tensor]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run PyTorch with ``threads`` intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_flops(model: torch.nn.Module, example: torch.Tensor | Inputs) -> int:
    """FLOPs of one eval-mode forward on ``example`` (a tensor or named inputs), conv + matmul only."""
    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*as_inputs(example).values())
    return int(counter.get_total_flops())


def time_stats(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Min and median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min_s": float(min(times)), "median_s": float(statistics.median(times)), "repeats": len(times)}


def torch_predictor(model: torch.nn.Module) -> NamedPredictor:
    """``{name: tensor}`` -> output of ``model`` in eval mode, under ``no_grad``."""
    model = model.eval().cpu()

    def predict(inputs: Inputs) -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs.values())

    return predict


def onnx_predictor(path: str | Path, threads: int) -> NamedPredictor:
    """``{name: tensor}`` -> output of the ONNX model at ``path`` (onnxruntime, ``threads`` threads)."""
    session = onnx_session(path, threads)

    def predict(inputs: Inputs) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])

    return predict


def single(predict: NamedPredictor, name: str = "input") -> Predictor:
    """A named-input predictor as a one-tensor predictor (for MONAI's sliding window)."""
    return lambda x: predict({name: x})


def sliding_window(
    predict: Predictor, volume: torch.Tensor, roi: tuple[int, ...], overlap: float = 0.5, sw_batch: int = 1
) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of ``volume`` (``1 1 *S``) with any predictor."""
    return sliding_window_inference(volume, roi, sw_batch, predict, overlap=overlap, mode="gaussian")


WholeInference = Callable[[NamedPredictor, Inputs], torch.Tensor]


def profile_network(
    name: str,
    model: torch.nn.Module,
    onnx_path: str | Path,
    deploy_inputs: Inputs,
    whole_inputs: Inputs,
    whole_inference: WholeInference,
    threads: int,
    repeats: int = 5,
) -> dict[str, Any]:
    """Cost of one deployable network on this CPU, PyTorch and onnxruntime side by side.

    Parameters; MACs (FLOPs / 2, conv + matmul) of one forward on ``deploy_inputs`` and of the whole
    case; whole-case latency ``whole_inference(predictor, whole_inputs)`` (a plain call, or a sliding
    window) with each backend: min and median over ``repeats`` runs after one warm-up, at ``threads``
    intra-op threads for both. ``best_s``: the faster backend's median. ``onnx_path`` must exist.
    """
    model = model.eval().cpu()
    row: dict[str, Any] = {
        "model": name,
        "params": count_parameters(model),
        "inputs": {k: list(v.shape) for k, v in deploy_inputs.items()},
        "whole_inputs": {k: list(v.shape) for k, v in whole_inputs.items()},
        "gmacs_input": count_flops(model, deploy_inputs) / 2e9,
        "threads": threads,
    }
    backends = {"torch": torch_predictor(model), "onnx": onnx_predictor(onnx_path, threads)}
    with torch_threads(threads):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            whole_inference(backends["torch"], whole_inputs)  # counted once; also a warm-up
        row["gmacs_whole"] = counter.get_total_flops() / 2e9
        for backend, fn in backends.items():
            stats = time_stats(lambda fn=fn: whole_inference(fn, whole_inputs), repeats, warmup=1)
            row |= {f"{k}_{backend}": v for k, v in stats.items() if k != "repeats"}
            row["repeats"] = stats["repeats"]
    row["best_backend"] = min(backends, key=lambda b: row[f"median_s_{b}"])
    row["best_s"] = row[f"median_s_{row['best_backend']}"]
    return row


def profile_model(
    name: str,
    model: torch.nn.Module,
    patch: tuple[int, ...],
    onnx_path: str | Path,
    threads: int,
    repeats: int = 5,
    volume: torch.Tensor | None = None,
    overlap: float = 0.5,
) -> dict[str, Any]:
    """A 3D patch network's cost on a seeded ``patch`` and, given ``volume`` (``1 1 *S``), on the whole
    volume by Gaussian-weighted sliding window (see :func:`profile_network`). Exports if missing."""
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        export_onnx(model, x, onnx_path)
    whole = {"input": volume if volume is not None else x}

    def run(predict: NamedPredictor, inputs: Inputs) -> torch.Tensor:
        return sliding_window(single(predict), inputs["input"], patch, overlap)

    return profile_network(name, model, onnx_path, {"input": x}, whole, run, threads, repeats) | {
        "patch": list(patch)
    }


def _window_starts(shape: Any, roi: tuple[int, ...], overlap: float) -> Iterator[tuple[int, ...]]:
    """The window positions MONAI visits (same rule: step ``roi * (1 - overlap)``, last window flush)."""
    axes = []
    for n, r in zip(shape, roi, strict=True):
        n = max(int(n), r)
        step = max(1, int(r * (1 - overlap)))
        starts = list(range(0, n - r + 1, step))
        if starts[-1] != n - r:
            starts.append(n - r)
        axes.append(starts)
    yield from (tuple(p) for p in np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(roi)))


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, library versions."""
    import os

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def speedup_table(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Each row against the ``reference`` row (e.g. the teacher): parameter and MAC ratios, and the
    speed-up best backend against best backend (and per backend)."""
    ref = next(r for r in rows if r["model"] == reference)
    out = []
    for r in rows:
        ratios = {
            "model": r["model"],
            "params_ratio": ref["params"] / r["params"],
            "macs_ratio": ref["gmacs_whole"] / r["gmacs_whole"] if r.get("gmacs_whole") else float("nan"),
            "speedup_best": ref["best_s"] / r["best_s"],
        }
        for backend in ("torch", "onnx"):
            ratios[f"speedup_{backend}"] = ref[f"median_s_{backend}"] / r[f"median_s_{backend}"]
        out.append(ratios)
    return out
