"""qpass kernels: the ``torch.ops.qpass`` op definitions and their reference implementations.

Importing this package registers the ops (``torch.ops.qpass.linear_4bit``, ``linear_int8``, ...).
"""

from . import codebooks, ops  # noqa: F401  (importing ops registers torch.ops.qpass.*)

__all__ = ["codebooks", "ops"]
