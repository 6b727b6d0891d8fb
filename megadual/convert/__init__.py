"""Checkpoint conversion: training checkpoints of any layout <-> Hugging Face <-> other layouts."""
