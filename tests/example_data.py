"""One rule for tests that need a fetched example set: skip on a developer's machine, fail under CI.

A CI run (``CI`` set, as every CI service does) fetches the sets first (``make test``), so a set missing
there is a broken pipeline, not a reason to pass quietly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medistill.io import examples


def require_example(name: str) -> Path:
    """The cache folder of example set ``name``, its packaged files verified (sha256).

    Missing derived files (the head CT's NIfTIs) are written from the verified ones, offline.
    When packaged files are missing or wrong: ``pytest.fail`` if ``$CI`` is set, else ``pytest.skip``.
    """
    spec = examples.get(name)
    status = examples.file_status(name)
    if all(status[f] == "ok" for f in spec.sha256):
        return examples.fetch(name, quiet=True)  # no download: at most the derived files are rebuilt
    problems = ", ".join(f"{f} {s}" for f, s in status.items() if s != "ok" and f in spec.sha256)
    message = f"example set {name} not usable ({problems}); run `medistill data fetch {name}`"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set: real-data tests must not skip)", pytrace=False)
    pytest.skip(message)
