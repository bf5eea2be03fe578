"""Deformable registration: an RCN teacher (affine + VTN cascades) distilled into an LDR student with ALDK.

Seed: Tran et al., "Light-weight deformable registration using adversarial learning with distilling
knowledge" (IEEE TMI 2022) on Recursive Cascaded Networks (Zhao et al., ICCV 2019). What we do
differently, and why (details in ``docs/registration.md``):

* ALDK has a gradient and a trained critic (:mod:`medistill.distill.aldk`); teacher fields come on the
  fly from the same augmented pair; the no-ALDK ablation runs on the same schedule and data.
* Data: one example volume is not a cohort, so the cohort is synthetic: subjects are the atlas warped
  by **known** smooth fields, which makes TRE against the truth measurable in mm (and Dice of warped
  labels). Validation runs during training; every stage and the SimpleITK B-spline baseline are
  evaluated on the same pairs, timed per pair, with folding and SD log-J.

Stages: a stage whose models include ``critic`` trains the student with ALDK against the frozen
``teacher``; any other stage trains ``net`` on the unsupervised registration loss alone. Losses are
dispatched by their ``role``: similarity (fixed vs warped, last stem), flow (each deformable stem's own
flow) and affine (the affine stem's matrix).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from medistill.config import ExperimentConfig, ModelSpec, StrictModel
from medistill.engine.data import KeyedDataset
from medistill.errors import MedistillError
from medistill.io.images import Image, check_same_grid, read_image, write_image
from medistill.registry import TASKS
from medistill.report.html import markdown_table
from medistill.tasks.base import Task, require_divisible
from medistill.tasks.registration_data import (
    Modality,
    Subject,
    merge_labels,
    normalise_intensity,
    pair_item,
    resample,
    synthetic_subject,
    to_network_grid,
    true_displacement,
)
from medistill.tasks.registration_pairs import AlignedPairs, align_pairs, read_pairs_file
from medistill.tasks.registration_real import PREALIGN_KINDS, PREALIGN_SIZE, RealEval
from medistill.tasks.registration_real import prealign as classical_prealign
from medistill.tasks.registration_refine import (
    RegRefine,
    context_objective,
    refine_displacement,
    stage_objective,
)

#: default structures of each example source: name -> label values merged into it
DEFAULT_LABELS: dict[str, dict[str, list[int]]] = {
    "chest-ct": {
        "lung_left": [10, 11],
        "lung_right": [12, 13, 14],
        "liver": [5],
        "heart": [51],
        "spleen": [1],
        "kidneys": [2, 3],
        "stomach": [6],
        "spine": list(range(25, 51)),
    },
    "brain-mr": {"grey_matter": [1], "white_matter": [2]},
    "head-mr": {},  # every AAL region, by its own value (filled from the atlas)
}


class RegData(StrictModel):
    example: Literal["chest-ct", "brain-mr", "head-mr"] = Field(
        "chest-ct", description="example volume the synthetic cohort is made from (the atlas)"
    )
    image: Path | None = Field(None, description="own atlas volume (instead of `example`)")
    label: Path | None = Field(None, description="label map on the own atlas's grid")
    modality: Literal["ct", "mr"] | None = Field(
        None, description="intensity scaling; default from the example"
    )
    size: int = Field(64, ge=16, description="network grid size per axis (the volume is resampled to size^3)")
    hu_window: tuple[float, float] = (-1000.0, 600.0)
    n_train: int = Field(16, ge=2, description="synthetic training subjects")
    n_val: int = Field(3, ge=1)
    n_test: int = Field(4, ge=2)
    pairs: Literal["subject", "atlas"] = Field(
        "subject", description="subject: ordered pairs of subjects; atlas: subject (fixed) vs atlas (moving)"
    )
    test_pairs: int = Field(8, ge=1, description="at most this many test pairs (all methods run on them)")
    field_amplitude: float = Field(0.06, ge=0, description="max B-spline control displacement / size")
    rotation_deg: float = Field(4.0, ge=0, description="max rotation of a subject about each axis (degrees)")
    shift: float = Field(0.03, ge=0, description="max shift / size")
    augment_amplitude: float = Field(
        0.04, ge=0, description="training B-spline augmentation of the moving image / size"
    )
    labels: dict[str, list[int]] | None = Field(
        None, description="structures {name: label values}; default per example"
    )
    sitk_iterations: int = Field(50, ge=1, description="SimpleITK B-spline baseline: optimiser iterations")
    threads: int = Field(2, ge=1, description="threads for timing (torch and SimpleITK)")
    pairs_file: Path | None = Field(
        None,
        description="own data: a JSON of real pairs per split (training / validation / test, "
        "tasks/registration_pairs.py) instead of the synthetic cohort",
    )


class RegistrationConfig(ExperimentConfig):
    task: str = "registration"
    data: RegData = RegData()
    eval: RealEval = RealEval()
    refine: RegRefine = Field(
        RegRefine(), description="instance optimisation after the deployed network (evaluate and predict)"
    )


class PairSet(KeyedDataset):
    """Pairs ``{"fixed", "moving"}`` ``1 S S S`` (+ labels); training augments the moving image by a random
    smooth field (the teacher and the student see the same augmented pair: it is one sample)."""

    def __init__(
        self, subjects: list[Subject], pairs: list[tuple[int, int]], augment: float, atlas: Subject | None
    ):
        self.subjects, self.pairs, self.augment, self.atlas = subjects, pairs, augment, atlas

    def __len__(self) -> int:
        return len(self.pairs)

    def subject(self, j: int) -> Subject:
        return self.atlas if j < 0 and self.atlas is not None else self.subjects[j]

    def get(self, index: int, rng: np.random.Generator | None) -> dict[str, torch.Tensor]:
        i, j = self.pairs[index]
        f, m = self.subjects[i], self.subject(j)
        return pair_item(f.image, m.image, f.labels, m.labels, self.augment, rng)


def _pairs(n: int, mode: str, limit: int | None = None) -> list[tuple[int, int]]:
    pairs = (
        [(i, -1) for i in range(n)]
        if mode == "atlas"
        else [(i, j) for i in range(n) for j in range(n) if i != j]
    )
    if limit is not None and len(pairs) > limit:
        pick = np.linspace(0, len(pairs) - 1, limit).round().astype(int)
        pairs = [pairs[k] for k in pick]
    return pairs


def mean_dice(warped: torch.Tensor, fixed: torch.Tensor, values: list[int]) -> float:
    """Mean Dice over structures of label maps ``B 1 *spatial`` (structures empty in both skipped)."""
    scores = []
    for v in values:
        a, b = warped == v, fixed == v
        denom = int(a.sum() + b.sum())
        if denom:
            scores.append(2 * float((a & b).sum()) / denom)
    return float(np.mean(scores)) if scores else float("nan")


def score_test_pair(
    test: PairSet, k: int, u: torch.Tensor, labels: dict[str, int], spacing: tuple[float, ...]
) -> dict[str, float]:
    """The scores of displacement ``u`` (``1 3 *spatial``, voxels; ``warped(x) = moving(x + u(x))``) on
    test pair ``k`` of a synthetic cohort: Dice and HD95 (mm) of the warped labels, TRE (mm) against the
    known field inside the body (fixed > 0.05), % det J <= 0 and SD of log det J. One function for
    ``evaluate`` and for the classical peers in ``benchmarks/``, so every method is scored alike."""
    from medistill.metrics.registration import field_tre, jacobian_stats, warped_label_dice

    b = test[k]
    i, j = test.pairs[k]
    truth = true_displacement(test.subjects[i], test.subject(j))
    mask = b["fixed"][0] > 0.05  # inside the body / head
    dice = warped_label_dice(b["moving_labels"][None], b["fixed_labels"][None], u, labels, spacing)
    jac = jacobian_stats(u, spacing)
    return {
        "dice": dice["overall"]["dice"],
        "hd95_mm": dice["overall"].get("hd95_mm", float("nan")),
        "tre_mm": field_tre(u, truth[None], spacing, mask=mask)["mean_mm"][0],
        "folding_percent": jac["folding_percent"][0],
        "sd_log_jacobian": jac["sd_log_jacobian"][0],
    }


@TASKS.register("registration")
class RegistrationTask(Task):
    """Teacher -> student deformable registration on a synthetic cohort with known fields."""

    Config = RegistrationConfig
    val_metric = "dice"
    val_mode = "max"
    predict_writes = "folder"

    def __init__(self, cfg: RegistrationConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.cfg: RegistrationConfig = cfg
        self._cohort: dict[str, Any] | None = None
        self.pair_specs = None if cfg.data.pairs_file is None else read_pairs_file(Path(cfg.data.pairs_file))
        if self.pair_specs is not None and cfg.eval.real_pairs:
            raise MedistillError(
                "eval.real_pairs: with data.pairs_file its 'test' pairs are the evaluation; list extra "
                "pairs there"
            )
        self._aligned: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}

    # --- data --------------------------------------------------------------------------------------
    @property
    def modality(self) -> Modality:
        d = self.cfg.data
        return d.modality or ("ct" if d.example.endswith("ct") else "mr")

    def atlas_source(self) -> tuple[Image, Image, dict[str, list[int]]]:
        """The example volume (raw values), its label map and the structures to score."""
        from medistill.io.examples import cache_dir, example_file

        ex, d = self.cfg.data.example, self.cfg.data
        if d.image is not None:
            if d.label is None:
                raise MedistillError("data.image is set but data.label is not; the cohort needs both")
            img, lab = read_image(d.image), read_image(d.label)
            if img.ndim != 3:
                raise MedistillError(f"{d.image}: expected a 3D volume, got shape {img.shape}")
            check_same_grid(img, lab, str(d.image), str(d.label))
            structures = d.labels or {str(int(v)): [int(v)] for v in np.unique(lab.array) if v > 0}
            return img, lab, structures
        if ex == "chest-ct":
            img, lab = read_image(example_file(ex, "cxr.nii.gz")), read_image(example_file(ex, "mask.nii.gz"))
        elif ex == "brain-mr":
            # the skull-stripped T1 and GM/WM maps the real brain pair is scored on (probability maps
            # >= 0.5; the files store probability x 255), so cohort and real pair share intensities
            from medistill.tasks.brain_tissue import load_brain_tissue

            tissue = load_brain_tissue(ex)
            img, lab = tissue.t1, tissue.labels
        else:
            from medistill.io.example_formats import load_head_mr

            img, lab, _ = load_head_mr(cache_dir(ex))
        check_same_grid(img, lab, f"{ex} image", f"{ex} labels")
        structures = self.cfg.data.labels or DEFAULT_LABELS[ex]
        if not structures:
            structures = {str(v): [int(v)] for v in np.unique(lab.array) if v > 0}
        return img, lab, structures

    def cohort(self) -> dict[str, Any]:
        """Atlas and synthetic subjects of each split (deterministic from the seed), built once."""
        if self._cohort is not None:
            return self._cohort
        d = self.cfg.data
        img, lab, structures = self.atlas_source()
        norm = img.with_array(normalise_intensity(img.array, self.modality, d.hu_window))
        merged = merge_labels(lab.array, structures)
        image, labels, grid = to_network_grid(norm, d.size, lab.with_array(merged))
        source = d.example if d.image is None else Path(d.image).name.split(".")[0]
        atlas = Subject(f"{source}-atlas", image, labels)
        rng = np.random.default_rng(self.cfg.seed + 1000)
        amp, shift = d.field_amplitude * d.size, d.shift * d.size
        splits: dict[str, list[Subject]] = {}
        for split, n in (("train", d.n_train), ("val", d.n_val), ("test", d.n_test)):
            splits[split] = [
                synthetic_subject(
                    f"syn-{d.example}-{split}{i:03d}", image, labels, rng, amp, d.rotation_deg, shift
                )
                for i in range(n)
            ]
        spacing = tuple(float(s) for s in np.diag(grid)[:3])
        self._cohort = {
            "atlas": atlas,
            "splits": splits,
            "grid": grid,
            "spacing": spacing,
            "structures": list(structures),
        }
        return self._cohort

    def aligned(self, split: str) -> tuple[list[dict[str, Any]], list[str]]:
        """``data.pairs_file``: the pre-aligned pairs of ``split`` and their structure names (built once)."""
        if split not in self._aligned:
            assert self.pair_specs is not None
            d = self.cfg.data
            self._aligned[split] = align_pairs(
                self.pair_specs[split], split, d.size, self.modality, d.hu_window, d.threads
            )
        return self._aligned[split]

    def structures(self) -> list[str]:
        """Names of the scored structures (label values 1..K of the network-grid label maps)."""
        return self.aligned("val")[1] if self.pair_specs is not None else self.cohort()["structures"]

    def pair_set(self, split: str, augment: bool = False, limit: int | None = None) -> PairSet:
        c, d = self.cohort(), self.cfg.data
        subjects = c["splits"][split]
        return PairSet(
            subjects,
            _pairs(len(subjects), d.pairs, limit),
            d.augment_amplitude * d.size if augment else 0.0,
            c["atlas"],
        )

    def build_data(self) -> tuple[KeyedDataset, KeyedDataset]:
        if self.pair_specs is not None:
            amplitude = self.cfg.data.augment_amplitude * self.cfg.data.size
            return AlignedPairs(self.aligned("train")[0], amplitude), AlignedPairs(
                self.aligned("val")[0], 0.0
            )
        return self.pair_set("train", augment=True), self.pair_set("val", limit=6)

    def splits(self) -> dict[str, list[str]]:
        if self.pair_specs is not None:
            return {k: [p.label() for p in v] for k, v in self.pair_specs.items()}
        return {k: [s.name for s in v] for k, v in self.cohort()["splits"].items()}

    # --- models and steps --------------------------------------------------------------------------
    def net_args(self, key: str, spec: ModelSpec, probe: bool = False) -> dict[str, Any]:
        return {"spatial_dims": 3}

    def build_model(self, key: str, spec: ModelSpec, probe: bool = False) -> torch.nn.Module:
        net = super().build_model(key, spec, probe)
        require_divisible(net, (self.cfg.data.size,) * 3, "data.size", spec.name)
        return net

    def registration_loss(
        self, ctx: Any, fixed: torch.Tensor, out: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The stage's losses by role: similarity of the last warp, smoothness of each stem's own flow,
        affine terms of the affine stem."""
        total: Any = 0.0
        parts: dict[str, float] = {}
        for key, term in ctx.losses.items():
            role = getattr(getattr(term.fn, "module", term.fn), "role", None)
            if role == "similarity":
                value = term(fixed, out["warped"])
            elif role == "flow":
                value = sum(term(f) for f in out["flows"])
            elif role == "affine":
                if "affine" not in out:
                    continue
                w = out["affine"][0]
                value = term(w + torch.eye(w.shape[-1], device=w.device))
            else:
                raise MedistillError(
                    f"stages.{ctx.stage}.losses.{key}: {term.spec.name} is not a registration loss"
                )
            total = total + term.weight * value
            parts[key] = float(value.detach())
        return total, parts

    def training_step(self, batch: dict[str, torch.Tensor], ctx: Any) -> dict[str, float]:
        fixed, moving = batch["fixed"], batch["moving"]
        out = ctx.models["net"](fixed, moving, stages=True)
        reg, parts = self.registration_loss(ctx, fixed, out)
        opt = "student" if "student" in ctx.optimizers else next(iter(ctx.optimizers))
        if "critic" not in ctx.models and "aldk" not in ctx.distillers:
            loss, kd_logs = reg, {}
            if ctx.distillers:  # field KD: the displacement pulled to the frozen teacher's on the same pair
                if "teacher" not in ctx.frozen:
                    raise MedistillError(f"stages.{ctx.stage}: distillers need frozen.teacher")
                kd, kd_parts = ctx.total(ctx.distillers, out["displacement"], self._teacher_field(ctx, batch))
                loss, kd_logs = reg + kd, {f"loss_{k}": v for k, v in kd_parts.items()}
            ctx.optimize(opt, loss)
            return {"loss": float(reg.detach())} | parts | kd_logs
        if "aldk" not in ctx.distillers or "teacher" not in ctx.frozen or "critic" not in ctx.models:
            raise MedistillError(f"stages.{ctx.stage}: a critic needs distillers.aldk and frozen.teacher")
        aldk = ctx.distillers["aldk"].fn
        teacher = self._teacher_field(ctx, batch)  # the teacher's field on this very (augmented) pair
        student = out["displacement"]
        for _ in range(aldk.n_critic):
            d_loss = aldk.critic_loss(ctx.models["critic"], teacher, student)
            ctx.optimize("critic", d_loss)
        with ctx.frozen_params("critic") as critic:
            adv = aldk.adversarial(critic, teacher, student)
            loss = aldk.student_loss(reg, adv)
            ctx.optimize(opt, loss)
        return {
            "loss": float(reg.detach()),
            "loss_adv": float(adv.detach()),
            "loss_critic": float(d_loss.detach()),
        } | parts

    def _teacher_field(self, ctx: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The frozen teacher's displacement on the batch's own (augmented) pairs, refined by
        ``refine.teacher_steps`` of instance optimisation on this stage's registration loss when set."""
        fixed, moving = batch["fixed"], batch["moving"]
        with torch.no_grad():
            u = ctx.frozen["teacher"].model(fixed, moving)
        steps = self.cfg.refine.teacher_steps
        if steps:
            cfg = self.cfg.refine.model_copy(update={"steps": steps})
            u = refine_displacement(fixed, moving, u, context_objective(self, ctx), cfg)
        return u.detach()

    def validate(self, ctx: Any, loader: Any) -> dict[str, float]:
        from medistill.nets.registration import SpatialTransformer

        nearest = SpatialTransformer("nearest", "zeros")
        values = list(range(1, len(self.structures()) + 1))
        scores = []
        for b in loader:
            u = ctx.models["net"](b["fixed"].to(ctx.device), b["moving"].to(ctx.device))
            warped = nearest(b["moving_labels"].to(u).float(), u).round().long()
            scores.append(mean_dice(warped.cpu(), b["fixed_labels"], values))
        return {"dice": float(np.nanmean(scores))}

    def deployed_stage(self) -> str:
        """The stage whose network ``predict`` uses (the last deployable; the last stage without any)."""
        deployables = self.runner.deployables()
        return deployables[-1][0] if deployables else self.cfg.stages[-1].name

    def refine(
        self, stage: str, fixed: torch.Tensor, moving: torch.Tensor, u: torch.Tensor, steps: int | None = None
    ) -> torch.Tensor:
        """``u`` of ``stage``'s network after ``refine.steps`` (or ``steps``) of instance optimisation on the
        stage's own loss (:mod:`medistill.tasks.registration_refine`)."""
        cfg = self.cfg.refine if steps is None else self.cfg.refine.model_copy(update={"steps": steps})
        return refine_displacement(fixed, moving, u, stage_objective(self, stage), cfg)

    # --- evaluation --------------------------------------------------------------------------------
    def methods(self) -> dict[str, Any]:
        """Registration methods of the evaluation: ``{name: fn(fixed, moving) -> u}`` on ``1 1 S S S``."""
        methods: dict[str, Any] = {"no_registration": lambda f, m: torch.zeros(1, 3, *f.shape[2:])}
        for st in self.stage_names():
            net = self.stage_model(st)
            methods[st] = lambda f, m, net=net: net(f, m)
        if self.cfg.refine.steps and self.stage_names():
            st = self.deployed_stage()
            methods[f"{st} + IO {self.cfg.refine.steps}"] = lambda f, m, st=st: self.refine(
                st, f, m, methods[st](f, m)
            )
        methods["sitk_bspline"] = lambda f, m: sitk_bspline(
            f, m, self.cfg.data.sitk_iterations, self.cfg.data.threads
        )
        return methods

    @torch.no_grad()
    def evaluate(self, out_dir: Path) -> dict[str, Any]:
        """Dice of warped labels, TRE (mm) against the known fields, folding, SD log-J and time per pair for
        no registration, every trained stage and the SimpleITK B-spline baseline, on the same test pairs."""
        if not self.stage_names():
            raise MedistillError(f"{self.run_dir}: no trained stage (run `medistill train` first)")
        if self.pair_specs is not None:  # own pairs: no known field, the test pairs' label overlap
            note = f"data.pairs_file {self.cfg.data.pairs_file}: its test pairs (no known field: no TRE)"
            return self.evaluate_real(Path(out_dir), {"cases": {}, "note": note, "figures": []})
        c, d = self.cohort(), self.cfg.data
        test = self.pair_set("test", limit=d.test_pairs)
        labels = {name: k for k, name in enumerate(c["structures"], start=1)}
        spacing = c["spacing"]
        threads = torch.get_num_threads()
        torch.set_num_threads(d.threads)
        rows: dict[str, dict[str, Any]] = {}
        fields: dict[str, torch.Tensor] = {}
        try:
            for name, fn in self.methods().items():
                per: dict[str, list[float]] = {
                    "dice": [],
                    "hd95_mm": [],
                    "tre_mm": [],
                    "folding_percent": [],
                    "sd_log_jacobian": [],
                    "seconds": [],
                }
                fn(test[0]["fixed"][None], test[0]["moving"][None])  # warm-up
                for k in range(len(test)):
                    b = test[k]
                    f, m = b["fixed"][None], b["moving"][None]
                    t0 = time.perf_counter()
                    u = fn(f, m).float()
                    per["seconds"].append(time.perf_counter() - t0)
                    for key, value in score_test_pair(test, k, u, labels, spacing).items():
                        per[key].append(value)
                    if k == 0:
                        fields[name] = u
                rows[name] = {}
                for key, vals in per.items():
                    rows[name][key] = float(np.mean(vals))
                    rows[name][f"{key}_sd"] = float(np.std(vals))
                rows[name]["n_pairs"] = len(test)
        finally:
            torch.set_num_threads(threads)
        figure = registration_figure(test[0], fields, Path(out_dir) / "registration.png")
        note = (
            f"n={len(test)} synthetic {d.pairs} test pairs from {d.example} at {d.size}^3 "
            f"(held-out subjects, known fields); mean over pairs, _sd = SD over pairs; TRE in the body; "
            f"time per pair with {d.threads} threads"
        )
        result: dict[str, Any] = {"cases": rows, "note": note, "figures": [str(figure)]}
        if self.cfg.eval.real_pairs:
            result = self.evaluate_real(Path(out_dir), result)
        return result

    @torch.no_grad()
    def evaluate_real(self, out_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
        """``eval.real_pairs`` after the synthetic table: the same methods after a shared classical
        pre-alignment, as their own table (``real_pairs.md`` and the report) and figure."""
        from medistill.tasks.registration_real import (
            evaluate_real_pairs,
            real_pairs_figure,
            real_pairs_table,
        )

        d, e = self.cfg.data, self.cfg.eval
        threads = torch.get_num_threads()
        torch.set_num_threads(d.threads)
        try:
            methods = self.methods()
            pairs = e.real_pairs if self.pair_specs is None else self.pair_specs["test"]
            real, aligned = evaluate_real_pairs(pairs, methods, d.size, self.modality, d.hu_window, d.threads)
        finally:
            torch.set_num_threads(threads)
        structures = aligned[0]["structures"]
        table = real_pairs_table(real, structures)
        kinds = sorted({p.prealign for p in pairs})
        table["note"] = (
            f"n={len(real)} real pairs (moving -> fixed), one row each: NOT a cohort. Shared pre-alignment "
            f"for every method: SimpleITK {'/'.join(kinds)} (centre of intensity mass, then rigid"
            f"{' + affine' if 'affine' in kinds else ''} on Mattes MI, coarse {PREALIGN_SIZE}^3 copies); "
            f"then each method's deformable step on the fixed image's {d.size}^3 network grid. Dice per "
            "structure of the warped moving labels (nearest); a missed structure scores 0 (HD95 = grid "
            "diagonal) and stays in the means; HD95 = mean over structures; % det J <= 0 of the deformable "
            f"field; seconds of the deformable step with {d.threads} threads after one warm-up"
        )
        stages = [m for m in methods if m not in ("no_registration", "sitk_bspline")]  # networks (+ IO)
        best = max(stages, key=lambda m: np.nanmean([real[p][m]["dice"] for p in real])) if stages else None
        shown = [m for m in (best, "sitk_bspline") if m is not None]
        figure = real_pairs_figure(aligned, shown, out_dir / "real_pairs.png")
        synthetic = {
            "title": "Synthetic test pairs (known fields)",
            "note": result["note"],
            "header": ["method", "Dice", "HD95 mm", "TRE mm", "% det J <= 0", "SD log J", "s / pair"],
            "rows": [
                [
                    m,
                    r["dice"],
                    r["hd95_mm"],
                    r["tre_mm"],
                    r["folding_percent"],
                    r["sd_log_jacobian"],
                    r["seconds"],
                ]
                for m, r in result["cases"].items()
            ],
        }
        (out_dir / "real_pairs.md").write_text(markdown_table(table))
        matrices = {p["name"]: p["matrix"].round(5).tolist() for p in aligned}
        tables = [synthetic, table]
        if not result["cases"]:  # own pairs: the means over the test pairs are the run's cases
            keys = ("dice", "hd95_mm", "folding_percent", "seconds")
            result["cases"] = {
                m: {k: float(np.nanmean([real[p][m][k] for p in real])) for k in keys}
                | {"n_pairs": len(real)}
                for m in methods
            }
            tables = [table]
        return result | {
            "real_pairs": real,
            "real_pairs_prealign": matrices,
            "real_pairs_note": table["note"],
            "tables": tables,
            "figures": [*result["figures"], str(figure)],
        }

    # --- deployment and prediction -----------------------------------------------------------------
    def deploy_inputs(self, stage: str, model: str) -> dict[str, torch.Tensor]:
        b = (
            AlignedPairs(self.aligned("val")[0], 0.0)[0]
            if self.pair_specs is not None
            else self.pair_set("test", limit=1)[0]
        )
        return {"fixed": b["fixed"][None], "moving": b["moving"][None]}

    def dynamic_spatial(self, stage: str, model: str) -> bool:
        """The exported warp's sampling grid is traced at the training size: the ONNX file takes that size."""
        return False

    def predict_file(self, src: Path, dst: Path) -> Path:
        raise MedistillError(
            "registration predicts on a pair: medistill predict RUN --fixed F --moving M --out DIR"
        )

    @torch.no_grad()
    def predict_pair(
        self,
        fixed_path: Path,
        moving_path: Path,
        out_dir: Path,
        labels_path: Path | None = None,
        refine_steps: int | None = None,
        prealign: str = "none",
    ) -> dict[str, Any]:
        """Register ``moving`` to ``fixed`` (any size, spacing, orientation) and write, in the fixed image's
        grid: ``warped.nii.gz``, ``displacement.nii.gz`` (X Y Z 1 3 vector, mm, world RAS+: fixed point x
        corresponds to moving point x + u(x)), ``warped_labels.nii.gz`` (nearest) and ``metrics.json``.
        The network's field is refined by ``refine_steps`` (default ``refine.steps``) of instance
        optimisation on the network grid. ``prealign`` ``affine`` / ``rigid``: the classical pre-alignment
        of the real-pair evaluation first (scans of two people rarely share a field of view); ``none``: the
        two scans' world boxes are taken as corresponding, as in training."""
        if prealign not in PREALIGN_KINDS:
            raise MedistillError(f"--prealign: expected one of {', '.join(PREALIGN_KINDS)}, got {prealign!r}")
        if refine_steps is not None and refine_steps < 0:
            raise MedistillError(f"--refine-steps: must be >= 0, got {refine_steps}")
        t_all = time.perf_counter()
        fixed, moving = read_image(fixed_path), read_image(moving_path)
        for path, img in ((fixed_path, fixed), (moving_path, moving)):
            if img.ndim != 3:
                raise MedistillError(f"{path}: expected a 3D volume, got shape {img.shape}")
        labels = None
        if labels_path is not None:
            labels = read_image(labels_path)
            check_same_grid(moving, labels, str(moving_path), str(labels_path))
        steps = self.cfg.refine.steps if refine_steps is None else refine_steps
        net = self.predict_model()
        d = self.cfg.data
        f_norm = fixed.with_array(normalise_intensity(fixed.array, self.modality, d.hu_window))
        m_norm = moving.with_array(normalise_intensity(moving.array, self.modality, d.hu_window))
        f_img, _, f_grid = to_network_grid(f_norm, d.size)
        matrix, t_pre = np.eye(4), 0.0
        if prealign == "none":
            m_img, _, m_grid = to_network_grid(m_norm, d.size)
        else:  # the moving scan through the pre-alignment onto the fixed network grid
            matrix, t_pre = classical_prealign(f_norm, m_norm, prealign, torch.get_num_threads())
            m_grid = matrix @ f_grid  # fixed network voxel -> moving world
            m_img = resample(m_norm.array, m_norm.affine, m_grid, (d.size,) * 3, padding="zeros")
        t0 = time.perf_counter()
        u = net(f_img[None], m_img[None])  # network-grid voxels
        t_net = time.perf_counter() - t0
        if steps:
            u = self.refine(self.deployed_stage(), f_img[None], m_img[None], u, steps)
        t_refine = time.perf_counter() - t0 - t_net
        u = u[0]
        # world displacement on the fixed image's own grid: X -> p (fixed network voxel) -> p + u(p) -> Y
        world_x = _apply(fixed.affine, torch.from_numpy(_voxel_coords(fixed.shape)))
        q = _apply(np.linalg.inv(f_grid), world_x) + resample(u, f_grid, fixed.affine, fixed.shape)
        world_y = _apply(m_grid, q)  # the corresponding moving points, mm
        disp = (world_y - world_x).numpy()
        warped = _sample_world(moving.array, moving.affine, world_y, "bilinear")
        out_dir.mkdir(parents=True, exist_ok=True)
        write_image(fixed.with_array(warped.astype(np.float32)), out_dir / "warped.nii.gz")
        _write_vector(np.moveaxis(disp, 0, -1), fixed.affine, out_dir / "displacement.nii.gz")
        if labels is not None:
            lab = _sample_world(labels.array.astype(np.float32), labels.affine, world_y, "nearest")
            write_image(fixed.with_array(np.rint(lab).astype(np.int16)), out_dir / "warped_labels.nii.gz")
        metrics = {
            "network_seconds": t_net,
            "refine_steps": steps,
            "refine_seconds": t_refine,
            "prealign": prealign,
            "prealign_seconds": t_pre,
            "prealign_matrix": np.asarray(matrix).round(6).tolist(),
            "total_seconds": time.perf_counter() - t_all,
            "network_grid": [d.size] * 3,
            "threads": torch.get_num_threads(),
        }
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return metrics


def _apply(affine: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """A 4x4 affine applied to points ``3 *shape``."""
    a = torch.from_numpy(np.asarray(affine, dtype=np.float32))
    return torch.einsum("ij,j...->i...", a[:3, :3], points) + a[:3, 3].view(3, *([1] * (points.ndim - 1)))


def _voxel_coords(shape: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))


def _sample_world(array: np.ndarray, affine: np.ndarray, world: torch.Tensor, mode: str) -> np.ndarray:
    """``array`` (voxel-to-world ``affine``) sampled at world points ``3 *shape`` (mm, RAS+)."""
    v = _apply(np.linalg.inv(affine), world)
    size = torch.tensor(array.shape, dtype=torch.float32).view(3, 1, 1, 1)
    g = (2 * v / (size - 1).clamp(min=1) - 1).flip(0).permute(1, 2, 3, 0)[None]
    src = torch.from_numpy(np.asarray(array, dtype=np.float32))[None, None]
    return torch.nn.functional.grid_sample(src, g, mode=mode, padding_mode="border", align_corners=True)[
        0, 0
    ].numpy()


def _write_vector(vectors: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """X Y Z 3 displacements (mm) -> a NIfTI X Y Z 1 3 with intent "vector" (ITK reads it as a field)."""
    import nibabel as nib

    from medistill.io.atomic import atomic_path

    img = nib.Nifti1Image(vectors[:, :, :, None, :].astype(np.float32), affine)
    img.header.set_intent("vector")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def sitk_bspline(fixed: torch.Tensor, moving: torch.Tensor, iterations: int, threads: int) -> torch.Tensor:
    """The classical baseline: SimpleITK B-spline registration (mesh 6^3, correlation metric, LBFGSB, two
    resolution levels) of ``1 1 S S S`` images on the network grid -> displacement ``1 3 S S S`` (voxels)."""
    import SimpleITK as sitk

    # arrays are (x, y, z) tensor order; SimpleITK reads numpy as (z, y, x): a unit-spacing image of the
    # transposed array has ITK axis k = tensor axis k
    f = sitk.GetImageFromArray(fixed[0, 0].numpy().transpose(2, 1, 0).astype(np.float32))
    m = sitk.GetImageFromArray(moving[0, 0].numpy().transpose(2, 1, 0).astype(np.float32))
    tx = sitk.BSplineTransformInitializer(f, [6, 6, 6], order=3)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iterations)
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1, 0])
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetNumberOfThreads(threads)
    reg.Execute(f, m)
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, f.GetSize(), f.GetOrigin(), f.GetSpacing(), f.GetDirection()
    )
    arr = sitk.GetArrayFromImage(
        field
    )  # (z, y, x, 3) with components along ITK x, y, z = tensor axes 0, 1, 2
    return torch.from_numpy(arr.transpose(3, 2, 1, 0).astype(np.float32).copy())[None]


def registration_figure(pair: dict[str, torch.Tensor], fields: dict[str, torch.Tensor], out: Path) -> Path:
    """Middle slices (along axis 2) of fixed, moving, each method's warped image and |difference|, the last
    method's deformed grid and Jacobian determinant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medistill.metrics.registration import jacobian_determinant
    from medistill.nets.registration import warp
    from medistill.report.figures import save_figure

    f, m = pair["fixed"][None], pair["moving"][None]
    z = f.shape[-1] // 2
    view = lambda a: np.flipud(a[..., z].T)  # noqa: E731 (anterior up for a RAS-ordered array)
    names = list(fields)
    cols = 2 + len(names)
    fig, ax = plt.subplots(2, cols, figsize=(2.2 * cols, 4.6))
    ax[0, 0].imshow(view(f[0, 0].numpy()), cmap="gray")
    ax[0, 0].set_title("fixed")
    ax[0, 1].imshow(view(m[0, 0].numpy()), cmap="gray")
    ax[0, 1].set_title("moving")
    ax[1, 1].imshow(view((f - m).abs()[0, 0].numpy()), cmap="magma", vmin=0, vmax=0.5)
    ax[1, 1].set_title("|fixed - moving|")
    for k, name in enumerate(names, start=2):
        w = warp(m, fields[name])
        ax[0, k].imshow(view(w[0, 0].numpy()), cmap="gray")
        ax[0, k].set_title(name, fontsize=8)
        ax[1, k].imshow(view((f - w).abs()[0, 0].numpy()), cmap="magma", vmin=0, vmax=0.5)
    last = fields[names[-1]] if names else torch.zeros(1, 3, *f.shape[2:])
    # deformed grid: the lines x = const, y = const moved by the in-plane displacement of the last method
    u = last[0, :2, :, :, z].numpy()
    xs, ys = np.meshgrid(np.arange(u.shape[1]), np.arange(u.shape[2]), indexing="ij")
    step = max(1, u.shape[1] // 16)
    a = ax[1, 0]
    for i in range(0, u.shape[1], step):
        a.plot(xs[i] + u[0, i], ys[i] + u[1, i], "k-", lw=0.5)
    for j in range(0, u.shape[2], step):
        a.plot(xs[:, j] + u[0, :, j], ys[:, j] + u[1, :, j], "k-", lw=0.5)
    a.set_title(f"grid ({names[-1] if names else '-'})", fontsize=8)
    a.set_aspect("equal")
    det = jacobian_determinant(last)[0, ..., z].numpy()
    inset = a.inset_axes([0.65, 0.65, 0.35, 0.35])
    inset.imshow(np.flipud(det.T), cmap="coolwarm", vmin=0, vmax=2)
    inset.set_xticks([])
    inset.set_yticks([])
    for x in ax.flat:
        if x is not a:
            x.axis("off")
    return save_figure(fig, out)
