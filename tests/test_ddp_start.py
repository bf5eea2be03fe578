"""Start-up of a multi-process run: what every rank does to the run folder before and while the group forms.

Under ``torchrun`` every rank runs ``medistill train`` in full, so every rank prepares the run folder and
writes ``config.yaml`` and ``splits.json``, and every rank logs. These tests run that start concurrently in
two processes and assert that it cannot fail by interleaving, and that ranks that disagree on what they
log fail with one clear line rather than averaging unrelated numbers (or, for larger messages, gloo
aborting the receiving rank with SIGABRT).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medistill.engine.distributed import DistInfo, all_reduce_mean
from medistill.errors import MedistillError
from medistill.runs import prepare_run
from test_engine import _free_port
from toy_tasks import toy_cfg

N_STAGES = 400  # stage folders whose files --overwrite deletes: a window wide enough to interleave


def _overwrite_worker(rank: int, run_dir: str, start: mp.Barrier, failures: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    start.wait()  # both ranks enter prepare_run at the same moment, as torchrun starts them
    try:
        prepare_run(toy_cfg(), Path(run_dir), overwrite=True)
    except Exception as exc:  # reported to the parent: a failure here is what the test looks for
        failures.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        raise


def test_two_ranks_overwriting_one_run_folder_at_once_both_succeed(tmp_path: Path) -> None:
    """``--overwrite`` on every rank deletes the same files: the second unlink of a file must not fail."""
    run = tmp_path / "run"
    for i in range(N_STAGES):
        stage = run / f"s{i}"
        stage.mkdir(parents=True)
        for name in ("last.pt", "best.pt", "metrics.jsonl"):
            (stage / name).write_bytes(b"x")
    (run / "splits.json").write_text("{}\n")
    ctx = mp.get_context("spawn")
    start, failures = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_overwrite_worker, args=(r, str(run), start, failures)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    errors = [failures.get() for _ in range(failures.qsize())] if not failures.empty() else []
    assert errors == [] and [p.exitcode for p in procs] == [0, 0], errors
    assert not list(run.rglob("*.pt")) and not list(run.rglob("metrics.jsonl"))
    assert (run / "config.yaml").is_file()


def _logs_worker(rank: int, port: int, cases: list[list[list[str]]], out: mp.Queue) -> None:
    """Each case gives each rank its log keys; rank r logs r + 1 for every key."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    info, cpu = DistInfo(rank, 2, rank), torch.device("cpu")
    results: list[object] = []
    try:
        for keys in cases:
            try:
                results.append(all_reduce_mean({k: float(rank + 1) for k in keys[rank]}, info, cpu))
            except MedistillError as exc:
                results.append(str(exc))
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_log_averaging_is_the_mean_over_ranks_and_refuses_ranks_with_other_keys() -> None:
    # rank 1 logs one key more in the second case: without the check, gloo pairs 'loss' with 'dice' and
    # 'loss_kd' with 'loss' (2 and 3 values) silently; 5 against 8 values kill one rank with SIGABRT
    cases = [[["loss", "loss_kd"], ["loss_kd", "loss"]], [["loss", "loss_kd"], ["dice", "loss", "loss_kd"]]]
    out = mp.get_context("spawn").Queue()
    mp.spawn(_logs_worker, args=(_free_port(), cases, out), nprocs=2, join=True)
    results = dict(out.get() for _ in range(2))
    for rank in (0, 1):
        same, differ = results[rank]
        assert same == {"loss": pytest.approx(1.5), "loss_kd": pytest.approx(1.5)}  # (1 + 2) / 2
        assert isinstance(differ, str) and "ranks log different values" in differ
        assert "rank 0: loss, loss_kd; rank 1: dice, loss, loss_kd" in differ
