"""Trainers, checkpoints, schedules and metrics."""
