"""Metrics: segmentation overlap, registration quality, image quality."""
