"""Seeing what a job does: the time split of every training step, per-step metrics files,
trace events for the launcher's timeline, end-of-run reports and TensorBoard scalars."""
