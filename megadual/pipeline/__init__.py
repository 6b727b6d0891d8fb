"""Offline data pipelines that run trained models over raw data (token pre-extraction)."""
