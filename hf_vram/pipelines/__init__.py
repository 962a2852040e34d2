"""Pipelines diffusers does not ship, saved with the outputs that need them (see pixel_pipelines.py)."""
