"""The synthetic cohort: deterministic for a seed, split by subject, labels only from the label set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medistill.errors import MedistillError
from medistill.io.datasets import load_msd, validate
from medistill.io.images import read_image
from medistill.tasks.cohort import CohortMaker, CohortSpec, make_cohort, phantom_abdomen, split_ids

SPEC = CohortSpec(n_subjects=5, spacing_mm=(4.0, 4.0, 4.0), min_voxels=50)


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


def test_subjects_keep_organs_with_words_order_and_drop_absent_ones(source) -> None:
    maker = CohortMaker(*source, SPEC)
    assert list(maker.labels) == [
        "background",
        "liver",
        "spleen",
        "kidney_left",
        "kidney_right",
        "stomach",
        "pancreas",
    ]
    assert "gallbladder" in maker.dropped and maker.dropped["gallbladder"] == 0
    ct, lab = maker.subject(2)
    assert ct.shape == lab.shape == maker.shape and np.allclose(ct.spacing, 4.0)
    # labels are sampled by nearest neighbour: only declared values, every organ still there
    assert set(np.unique(lab.array).tolist()) == set(maker.labels.values())
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
