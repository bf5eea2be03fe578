"""The synthetic cohort: deterministic for a seed, split by subject, labels only from the label set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medistill.cli import main
from medistill.errors import MedistillError
from medistill.io.datasets import load_msd, validate
from medistill.io.images import read_image
from medistill.tasks.cohort import (
    WORD_LABELS,
    CohortMaker,
    CohortSpec,
    make_cohort,
    phantom_abdomen,
    split_ids,
)

SPEC = CohortSpec(n_subjects=5, spacing_mm=(4.0, 4.0, 4.0), min_volume_ml=3.0)
# the phantom's organs with their fixed WORD ids (no gallbladder, duodenum, ... in the phantom)
PHANTOM_IDS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4, "stomach": 5, "pancreas": 8}


@pytest.fixture(scope="module")
def source():
    return phantom_abdomen()


def test_same_seed_same_subjects_other_seed_other_subjects(source) -> None:
    a, b = CohortMaker(*source, SPEC), CohortMaker(*source, SPEC)
    other = CohortMaker(*source, CohortSpec(**{**SPEC.__dict__, "seed": 1}))
    for i in (0, 3):
        (ct_a, lab_a), (ct_b, lab_b) = a.subject(i), b.subject(i)
        assert np.array_equal(ct_a.array, ct_b.array) and np.array_equal(lab_a.array, lab_b.array)
        assert np.array_equal(ct_a.affine, ct_b.affine)
    assert not np.array_equal(a.subject(0)[1].array, other.subject(0)[1].array)
    assert not np.array_equal(a.subject(0)[1].array, a.subject(1)[1].array)  # subjects differ


def test_subjects_keep_organs_with_words_fixed_ids_and_absent_ones_are_just_absent(source) -> None:
    maker = CohortMaker(*source, SPEC)
    assert maker.labels == {"background": 0, **PHANTOM_IDS}  # pancreas stays 8 with 6 and 7 absent
    assert list(WORD_LABELS)[:6] == ["background", *list(PHANTOM_IDS)[:5]] and WORD_LABELS["adrenal"] == 12
    assert maker.absent["gallbladder"] == 0.0 and "pancreas" not in maker.absent
    ct, lab = maker.subject(2)
    assert ct.shape == lab.shape == maker.shape and np.allclose(ct.spacing, 4.0)
    # labels are sampled by nearest neighbour: only the phantom's organs, at their WORD ids
    assert set(np.unique(lab.array).tolist()) == {0, *PHANTOM_IDS.values()}
    # the deformed liver keeps roughly its volume (affine zoom <= 8 %, smooth deformation)
    ref = (source[1].array == 5).sum() * np.prod(source[1].spacing) / 4.0**3
    assert 0.7 < (lab.array == 1).sum() / ref < 1.3
    assert -1024 <= ct.array.min() and ct.array.max() <= 3071


def test_cohort_folder_is_msd_and_split_by_subject(tmp_path: Path, source) -> None:
    ds = make_cohort(tmp_path / "cohort", SPEC, *source)
    validate(load_msd(tmp_path / "cohort" / "dataset.json"))  # files, grids and label values check out
    meta = json.loads((tmp_path / "cohort" / "dataset.json").read_text())
    assert "synthetic cohort from chest-ct" in meta["description"] or "synthetic" in meta["description"]
    splits = json.loads((tmp_path / "cohort" / "splits.json").read_text())
    ids = [c.id for c in ds.cases]
    parts = [set(splits[k]) for k in ("train", "val", "test")]
    assert all(parts) and set().union(*parts) == set(ids) and sum(map(len, parts)) == len(ids)
    values = set(ds.labels.values())
    for case in ds.cases:
        assert set(np.unique(read_image(case.label).array).tolist()) <= values


def test_split_needs_three_subjects_and_is_seeded() -> None:
    ids = [f"s{i}" for i in range(12)]
    assert split_ids(ids, (0.6, 0.2, 0.2), 0) == split_ids(ids, (0.6, 0.2, 0.2), 0)
    assert split_ids(ids, (0.6, 0.2, 0.2), 0) != split_ids(ids, (0.6, 0.2, 0.2), 1)
    with pytest.raises(MedistillError, match="at least 3"):
        split_ids(ids[:2], (0.6, 0.2, 0.2), 0)


def test_label_ids_do_not_depend_on_spacing_or_on_which_organs_are_left_out(source) -> None:
    """The same organ has the same id at 3.5 and 6 mm, and leaving the kidneys out moves no other id.

    With a voxel-count threshold the 6 mm cohort lost organs and renumbered the rest (stomach became 3);
    a volume in ml means the same at every spacing, and ids come from WORD's list, not from a count."""
    fine = CohortMaker(*source, CohortSpec(n_subjects=3, spacing_mm=(3.5,) * 3, min_volume_ml=3.0))
    coarse = CohortMaker(*source, CohortSpec(n_subjects=3, spacing_mm=(6.0,) * 3, min_volume_ml=3.0))
    assert fine.labels == coarse.labels == {"background": 0, **PHANTOM_IDS}
    assert fine.absent == coarse.absent  # the threshold is judged in ml on the source, not in voxels
    volumes = []  # subject 0 is the same deformed anatomy at both spacings: each id, the same organ
    for maker in (fine, coarse):
        lab = maker.subject(0)[1].array
        assert set(np.unique(lab).tolist()) == {0, *PHANTOM_IDS.values()}
        volumes.append(
            {v: (lab == v).sum() * np.prod(maker.spec.spacing_mm) / 1000.0 for v in PHANTOM_IDS.values()}
        )
    for name, v in PHANTOM_IDS.items():
        assert volumes[0][v] == pytest.approx(volumes[1][v], rel=0.15), name  # ml at 3.5 vs 6 mm
    no_kidneys = CohortMaker(*source, CohortSpec(n_subjects=3, spacing_mm=(6.0,) * 3, min_volume_ml=25.0))
    assert set(no_kidneys.absent) >= {"kidney_left", "kidney_right", "pancreas"}
    assert no_kidneys.labels == {"background": 0, "liver": 1, "spleen": 2, "stomach": 5}
    lab = no_kidneys.subject(0)[1].array
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 5}  # liver, spleen, stomach keep 1, 2, 5


def test_dataset_json_lists_the_labelled_organs_at_their_fixed_ids_and_names_the_absent(
    tmp_path: Path, source
) -> None:
    for spacing in (3.5, 6.0):
        spec = CohortSpec(n_subjects=3, spacing_mm=(spacing,) * 3, min_volume_ml=3.0)
        make_cohort(tmp_path / f"c{spacing}", spec, *source)
    metas = [json.loads((tmp_path / f"c{s}" / "dataset.json").read_text()) for s in (3.5, 6.0)]
    assert (
        metas[0]["labels"]
        == metas[1]["labels"]
        == {"0": "background", **{str(v): k for k, v in PHANTOM_IDS.items()}}
    )
    assert "gallbladder (0.0 ml)" in metas[0]["description"] and "adrenal (0.0 ml)" in metas[1]["description"]


@pytest.mark.parametrize("spacing", ["0", "-2", "nan"])
def test_cli_refuses_a_spacing_that_is_not_a_positive_length(
    spacing: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "cohort", "--out", str(tmp_path / "c"), "--n", "3", "--spacing", spacing])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--spacing must be a positive length in mm" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()
    with pytest.raises(MedistillError, match="spacing_mm must be 3 positive lengths"):
        CohortSpec(spacing_mm=(float(spacing),) * 3)
