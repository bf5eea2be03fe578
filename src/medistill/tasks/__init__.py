"""Tasks: one module per system. Importing this package registers every task in TASKS."""

from __future__ import annotations

from medistill.tasks import lung2d, segmentation3d, xray  # noqa: F401
