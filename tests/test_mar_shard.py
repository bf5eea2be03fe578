"""``simulate metal --shard K/N``: the parts of an array job write what one machine writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medistill.cli import main
from medistill.io.images import Image, write_image
from medistill.physics import ct

SIZE = 40


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    sod = 2.6 * SIZE

    def tiny() -> ct.CTGeometry:
        spacing = ct._fan_arc_spacing(SIZE, sod, 61)
        return ct.CTGeometry(
            SIZE, 1.0, 48, 61, spacing, beam="fan", detector="arc", sod_mm=sod, sdd_mm=2 * sod
        )

    monkeypatch.setitem(ct.PRESETS, "tiny", tiny)


def test_shards_of_an_array_job_equal_one_run(tmp_path: Path) -> None:
    x, y = np.meshgrid(*[np.linspace(-1, 1, 80)] * 2, indexing="ij")
    hu = np.full((80, 80, 5), -1000.0, np.float32)
    hu[(x**2 + y**2) < 0.8**2] = 30.0
    hu[((x - 0.3) ** 2 + y**2) < 0.15**2] = 900.0
    src = tmp_path / "ct.nii.gz"
    write_image(Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), src)
    common = ["simulate", "metal", str(src), "--geometry", "tiny", "--slices", "0:5", "--seed", "2"]
    main([*common, "--out", str(tmp_path / "one")])
    for part in ("3/3", "1/3", "2/3"):  # any finishing order
        assert not (tmp_path / "parts" / "index.csv").exists()
        main([*common, "--out", str(tmp_path / "parts"), "--shard", part])
    one, parts = tmp_path / "one", tmp_path / "parts"
    assert (one / "index.csv").read_text() == (parts / "index.csv").read_text()
    shards = sorted(p.name for p in one.glob("slice_*.npz"))
    assert shards == sorted(p.name for p in parts.glob("slice_*.npz")) and len(shards) == 5
    for name in shards:
        with np.load(one / name) as a, np.load(parts / name) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files)
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "bad"), "--shard", "4/3"])
