"""Cost of a network on CPU, measured: parameters, FLOPs, and latency in PyTorch and onnxruntime.

FLOPs do not predict CPU latency (DESIGN.md), so both are reported side by side: FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; norms, activations and
interpolation are not counted), latency as the median wall time of repeated runs after warm-up, with
PyTorch and onnxruntime given the same number of intra-op threads. End-to-end latency of a whole volume
runs MONAI's Gaussian-weighted sliding window with either backend as the predictor.
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

from medistill.deploy.export import export_onnx, onnx_session
from medistill.nets.blocks import count_parameters

Predictor = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run PyTorch with ``threads`` intra-op threads, restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one eval-mode forward on ``example`` (``B C *S``), conv + matmul only."""
    model = model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(statistics.median(times))


def torch_predictor(model: torch.nn.Module) -> Predictor:
    model = model.eval().cpu()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return predict


def onnx_predictor(path: str | Path, threads: int) -> Predictor:
    session = onnx_session(path, threads)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])

    return predict


def sliding_window(
    predict: Predictor, volume: torch.Tensor, roi: tuple[int, ...], overlap: float = 0.5, sw_batch: int = 1
) -> torch.Tensor:
    """Gaussian-weighted sliding-window logits of ``volume`` (``1 1 *S``) with any predictor."""
    return sliding_window_inference(volume, roi, sw_batch, predict, overlap=overlap, mode="gaussian")


def profile_model(
    name: str,
    model: torch.nn.Module,
    patch: tuple[int, ...],
    onnx_path: str | Path,
    threads: int,
    repeats: int = 3,
    volume: torch.Tensor | None = None,
    overlap: float = 0.5,
) -> dict[str, Any]:
    """Params, FLOPs per patch, patch latency (torch, onnxruntime) and, given ``volume`` (``1 1 *S``),
    whole-volume sliding-window latency with each backend. Exports ``model`` to ``onnx_path`` if missing."""
    model = model.eval().cpu()
    x = torch.randn(1, 1, *patch, generator=torch.Generator().manual_seed(0))
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        export_onnx(model, x, onnx_path)
    row: dict[str, Any] = {
        "model": name,
        "params": count_parameters(model),
        "patch": list(patch),
        "gflops_patch": count_flops(model, x) / 1e9,
        "threads": threads,
    }
    torch_fn, ort_fn = torch_predictor(model), onnx_predictor(onnx_path, threads)
    with torch_threads(threads):
        row["patch_s_torch"] = median_seconds(lambda: torch_fn(x), repeats)
        row["patch_s_onnx"] = median_seconds(lambda: ort_fn(x), repeats)
        if volume is not None:
            row["volume_shape"] = list(volume.shape[2:])
            row["windows"] = len(list(_window_starts(volume.shape[2:], patch, overlap)))
            for backend, fn in (("torch", torch_fn), ("onnx", ort_fn)):
                row[f"volume_s_{backend}"] = median_seconds(
                    lambda fn=fn: sliding_window(fn, volume, patch, overlap), max(1, repeats // 3), warmup=0
                )
    return row


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
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def speedup_table(rows: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Each row's params / latency ratio against the ``reference`` model's row (e.g. the teacher)."""
    ref = next(r for r in rows if r["model"] == reference)
    out = []
    for r in rows:
        ratios = {"model": r["model"], "params_ratio": ref["params"] / r["params"]}
        for key in ("patch_s_torch", "patch_s_onnx", "volume_s_torch", "volume_s_onnx"):
            if key in r and key in ref:
                ratios["speedup_" + key.replace("_s_", "_")] = ref[key] / r[key]
        out.append(ratios)
    return out
