"""Checkpoints in the transformers + bitsandbytes layout: safetensors only, atomic writes."""

from .errors import CheckpointError
from .load import from_pretrained
from .save import save_pretrained

__all__ = ["CheckpointError", "from_pretrained", "save_pretrained"]
