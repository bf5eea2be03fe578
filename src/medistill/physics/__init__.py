"""Imaging physics as pure torch functions: attenuation, DRRs, CT projection and metal artifacts."""
