"""medistill: small, fast medical-imaging models trained on simulated data and distilled from teachers."""

from __future__ import annotations

__version__ = "0.1.0"
