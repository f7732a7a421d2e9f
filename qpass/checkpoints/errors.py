"""Checkpoint errors name the file or tensor and say what to do."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written as asked."""
