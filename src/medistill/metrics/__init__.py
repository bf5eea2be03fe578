"""Metrics that say what they count: segmentation overlap, registration quality, image quality in HU."""

from medistill.metrics.image_quality import DEFAULT_WINDOW_HU, band_around, image_quality
from medistill.metrics.registration import (
    field_tre,
    jacobian_determinant,
    jacobian_stats,
    landmark_tre,
    sample_displacement,
    warped_label_dice,
)
from medistill.metrics.segmentation import (
    STATUSES,
    counts_caption,
    dice,
    dice_per_label,
    image_diagonal_mm,
    rows_markdown,
    score_structures,
    summarise,
    summarise_batch,
    summary_markdown,
    summary_row,
)

__all__ = [
    "DEFAULT_WINDOW_HU",
    "STATUSES",
    "band_around",
    "counts_caption",
    "dice",
    "dice_per_label",
    "field_tre",
    "image_diagonal_mm",
    "image_quality",
    "jacobian_determinant",
    "jacobian_stats",
    "landmark_tre",
    "rows_markdown",
    "sample_displacement",
    "score_structures",
    "summarise",
    "summarise_batch",
    "summary_markdown",
    "summary_row",
    "warped_label_dice",
]
