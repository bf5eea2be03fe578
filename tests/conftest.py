"""Shared fixtures: tiny synthetic images that stand in for real scans (milliseconds to make).

Tests that need a fetched example set take its folder from ``example_data.require_example`` (skips on a
developer's machine, fails when ``CI`` is set). The CT system-matrix disk cache is off in tests (the test
geometries build in milliseconds; the cache tests switch it on in a temporary folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medistill.io.images import Image, write_image


@pytest.fixture(autouse=True)
def _no_ct_matrix_disk_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep test geometries out of the user's ~/.cache/medistill/ct_matrices."""
    monkeypatch.setenv("MEDISTILL_CT_CACHE", "0")


def make_ct(shape: tuple[int, int, int] = (12, 10, 8), seed: int = 0) -> tuple[Image, Image]:
    """A CT-like volume (air, body of water/soft tissue, a bone rod) and its label map (0 bg, 1 body, 2 bone).

    The affine is oblique-free but anisotropic with a non-zero origin and a flipped x axis (LAS, as
    many scanners export), so code that ignores spacing or orientation gets a different answer.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x**2 + y**2) < 0.7**2
    bone = ((x - 0.2) ** 2 + y**2) < 0.2**2
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[bone] = 700.0
    hu += rng.normal(0, 5, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[body] = 1
    label[bone] = 2
    affine = np.array(
        [[-0.8, 0, 0, 30.0], [0, 0.7, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]], dtype=np.float64
    )
    return Image(hu, affine), Image(label, affine.copy())


@pytest.fixture
def ct_pair() -> tuple[Image, Image]:
    """(CT image in HU, label map) in memory."""
    return make_ct()


@pytest.fixture
def ct_files(tmp_path: Path) -> tuple[Path, Path]:
    """(ct.nii.gz, label.nii.gz) written in ``tmp_path``."""
    ct, label = make_ct()
    write_image(ct, tmp_path / "ct.nii.gz")
    write_image(label, tmp_path / "label.nii.gz")
    return tmp_path / "ct.nii.gz", tmp_path / "label.nii.gz"
