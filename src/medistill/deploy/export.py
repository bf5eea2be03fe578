"""ONNX export with an output parity check against PyTorch.

Every exported model is run once by onnxruntime on the example input and compared with the eval-mode
PyTorch output; the maximum absolute difference is returned (and recorded by ``medistill export``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | Path,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    opset: int = 17,
) -> Path:
    """Export ``model`` (in eval mode, on CPU) to ``path`` atomically; input ``input``, output ``output``."""
    model = model.eval().cpu()
    example = example.cpu()
    axes: dict[int, str] = {}
    if dynamic_batch:
        axes[0] = "batch"
    if dynamic_spatial:
        axes.update({d: f"s{d - 2}" for d in range(2, example.ndim)})
    dyn = {"input": axes, "output": axes} if axes else None
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # instance norm always uses input statistics; the exporter's warning about it is noise
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
    return Path(path)


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (``threads`` intra-op threads; default: onnxruntime's choice)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(model: torch.nn.Module, path: str | Path, example: torch.Tensor) -> float:
    """Max |onnxruntime - torch| on ``example``."""
    with torch.no_grad():
        ref = model.eval().cpu()(example.cpu())
    if isinstance(ref, list | tuple):
        ref = ref[0]
    out = onnx_session(path).run(None, {"input": example.cpu().numpy()})[0]
    return float(np.max(np.abs(out - ref.numpy())))


def export_with_parity(
    model: torch.nn.Module, example: torch.Tensor, path: str | Path, tolerance: float = 1e-3, **kw
) -> float:
    """Export, then check parity; raise if outputs disagree by more than ``tolerance``."""
    export_onnx(model, example, path, **kw)
    diff = parity(model, path, example)
    if not diff <= tolerance:
        raise MedistillError(f"{path}: ONNX output differs from PyTorch by {diff:.3g} (> {tolerance})")
    return diff
