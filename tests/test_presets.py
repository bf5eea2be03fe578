"""Every shipped preset validates: a typo or a stale key in configs/ fails here, not in a user's run."""

from __future__ import annotations

from pathlib import Path

import pytest

from medistill.config import load_config

PRESETS = sorted(Path("configs").glob("*.yaml"))


def test_there_are_presets() -> None:
    assert {p.name for p in PRESETS} >= {"demo.yaml", "xray_bones.yaml", "xray_kd_study.yaml", "lung2d.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_validates(preset: Path) -> None:
    cfg = load_config(preset, [])
    names = [st.name for st in cfg.stages]
    assert names and len(set(names)) == len(names)
    for ref in cfg.export or []:
        assert ref.split(".")[0] in names, ref
