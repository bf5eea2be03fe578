"""Tasks: one module per system. Importing this package registers every task in TASKS."""

from __future__ import annotations

from medistill.tasks import lung2d, mar, registration, segmentation3d, synthesis, xray  # noqa: F401
