"""How close a quantized model stays: perplexity of a causal LM on a token stream, the offline English
text qpass evaluates on, and the relative error of an output."""

from __future__ import annotations

import math

import torch
from torch import nn


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` over all elements, in float64 (NaN if ``actual`` holds one)."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def pydoc_text(max_chars: int | None = None) -> str:
    """English prose shipped with CPython (``pydoc_data.topics``): the Python reference manual's topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return text[:max_chars] if max_chars else text


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, window: int = 512, max_windows: int | None = None) -> float:
    """exp(mean next-token negative log-likelihood) over non-overlapping windows of ``token_ids`` (1-D)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_windows = (token_ids.numel() - 1) // window
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"need more than {window} tokens to measure perplexity, got {token_ids.numel()}")
    total_nll, total_tokens = 0.0, 0
    for i in range(n_windows):
        chunk = token_ids[i * window : (i + 1) * window + 1].to(device)
        logits = model(chunk[:-1].unsqueeze(0)).logits.float()
        nll = nn.functional.cross_entropy(logits[0], chunk[1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk.numel() - 1
    return math.exp(total_nll / total_tokens)
