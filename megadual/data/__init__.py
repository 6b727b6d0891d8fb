"""Datasets, shard schema, packing and loaders. Imports only megadual.config, never models."""
