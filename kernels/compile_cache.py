"""Keeps ``torch.compile``'s on-disk caches from replaying code traced from another version of the ops.

``linear_4bit``, ``dequantize_4bit``, ``linear_int8`` and ``dequantize_int8`` are ``triton_op``s:
``torch.compile`` traces their Python bodies into the code it generates. AOTAutograd's cache keys a
compiled graph by the graph Dynamo captured, in which each of them is one ``qpass`` node, so it cannot
tell when a body changed: after an upgrade of qpass (or an edit in a checkout) a process compiling the
same model loaded the code compiled from the old body (measured: torch 2.13, an NF4 layer compiled under
``torch.no_grad()``, ``autograd_cache_hit`` and the old result after the body was changed).

Importing the ops therefore adds ``qpass-kernels-<digest>`` to ``torch.compiler.config.cache_key_tag``,
which every torch.compile cache (FX graph, AOTAutograd, autotuning, PGO) puts in its keys. The digest is
of this package's Python sources, so it changes with any change to an op body, and only then. A tag
the user set (``TORCH_COMPILE_CACHE_KEY_TAG``) is kept: qpass' part is appended to it after a "+".
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

TAG_PREFIX = "qpass-kernels-"
_SOURCES = Path(__file__).resolve().parent


def source_digest(folder: Path = _SOURCES) -> str:
    """The first 16 hex digits of the SHA-256 of the ``*.py`` files directly in ``folder``, each file's name
    and bytes, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tag_compile_caches(folder: Path = _SOURCES) -> str:
    """Put ``qpass-kernels-<source_digest(folder)>`` into ``torch.compiler.config.cache_key_tag``, in place
    of an earlier qpass tag, after the user's own; returns the whole tag."""
    current = torch.compiler.config.cache_key_tag.split("+")
    tag = "+".join([part for part in current if part and not part.startswith(TAG_PREFIX)]
                   + [TAG_PREFIX + source_digest(folder)])
    torch.compiler.config.cache_key_tag = tag
    return tag
