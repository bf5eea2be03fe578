"""ONNX export with an output parity check against PyTorch.

Every exported model is run once by onnxruntime on the example input and compared with the eval-mode
PyTorch output; the maximum absolute difference is returned (and recorded by ``medistill export``).
The task's preprocessing contract (HU window or normalisation statistics, spacing, orientation, labels,
thresholds) travels in the model's ``metadata_props`` (:func:`contract_metadata`, :func:`read_contract`)
and in a JSON file beside it, so a deployment needs no config.yaml.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medistill.errors import MedistillError
from medistill.io.atomic import atomic_path

Inputs = dict[str, torch.Tensor]


def as_inputs(example: torch.Tensor | Inputs) -> Inputs:
    """Named inputs (a single tensor is called ``input``), in the order the network's forward takes them."""
    return {"input": example} if isinstance(example, torch.Tensor) else dict(example)


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor | Inputs,
    path: str | Path,
    dynamic_batch: bool = True,
    dynamic_spatial: bool = False,
    opset: int = 17,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export ``model`` (in eval mode, on CPU) to ``path`` atomically.

    ``example``: one tensor, or ``{name: tensor}`` passed positionally in that order (a registration
    network takes ``fixed`` and ``moving``); the ONNX inputs carry those names, the output is ``output``.
    ``dynamic_spatial`` leaves every axis after the channel free (fully convolutional networks);
    ``metadata`` is stored in the model's ``metadata_props`` (the preprocessing contract).
    """
    model = model.eval().cpu()
    inputs = {k: v.cpu() for k, v in as_inputs(example).items()}
    dyn: dict[str, dict[int, str]] = {}
    for name, x in inputs.items():
        axes: dict[int, str] = {0: "batch"} if dynamic_batch else {}
        if dynamic_spatial:
            axes.update({d: f"s{d - 2}" for d in range(2, x.ndim)})
        if axes:
            dyn[name] = axes
    if dyn:
        dyn["output"] = next(iter(dyn.values()))
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        # instance norm always uses input statistics; the exporter's warning about it is noise
        warnings.filterwarnings("ignore", message=".*instance_norm.*")
        torch.onnx.export(
            model,
            tuple(inputs.values()),
            str(tmp),
            input_names=list(inputs),
            output_names=["output"],
            dynamic_axes=dyn or None,
            opset_version=opset,
            dynamo=False,
        )
        if metadata:
            import onnx

            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=str(value))
            onnx.save(proto, str(tmp))
    return Path(path)


def contract_metadata(contract: dict[str, Any]) -> dict[str, str]:
    """A preprocessing contract as ONNX ``metadata_props`` (string values): each top-level entry as JSON,
    plus the whole contract under ``medistill_contract``, so any ONNX runtime can read it back."""
    meta = {str(k): json.dumps(v, sort_keys=True) for k, v in contract.items()}
    return meta | {"medistill_contract": json.dumps(contract, sort_keys=True)}


def read_contract(path: str | Path) -> dict[str, Any]:
    """The preprocessing contract stored in an exported model's metadata (see :func:`contract_metadata`)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "medistill_contract" not in props:
        raise MedistillError(f"{path}: no medistill preprocessing contract in the model's metadata")
    return json.loads(props["medistill_contract"])


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (``threads`` intra-op threads; default: onnxruntime's choice)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(model: torch.nn.Module, path: str | Path, example: torch.Tensor | Inputs) -> float:
    """Max |onnxruntime - torch| on ``example`` (one tensor or named inputs)."""
    inputs = {k: v.cpu() for k, v in as_inputs(example).items()}
    with torch.no_grad():
        ref = model.eval().cpu()(*inputs.values())
    if isinstance(ref, list | tuple):
        ref = ref[0]
    out = onnx_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return float(np.max(np.abs(out - ref.numpy())))


def export_with_parity(
    model: torch.nn.Module, example: torch.Tensor | Inputs, path: str | Path, tolerance: float = 1e-3, **kw
) -> float:
    """Export, then check parity; raise if outputs disagree by more than ``tolerance``."""
    export_onnx(model, example, path, **kw)
    diff = parity(model, path, example)
    if not diff <= tolerance:
        raise MedistillError(f"{path}: ONNX output differs from PyTorch by {diff:.3g} (> {tolerance})")
    return diff
