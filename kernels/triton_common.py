"""What the Triton kernels share (4-bit and int8): the dot in the compute dtype, a product that is
never fused into an add, the autotune bucket of M and config pruning by it, and split-K for small M
with its deterministic reduction."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# Whether kernels run in Triton's NumPy interpreter (TRITON_INTERPRET=1), read when this module loads,
# as Triton itself reads it. A global constexpr, so Inductor's copy of a kernel keeps it.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def mul_rn(a, b):
    """float32 ``a * b`` rounded to nearest on its own. Triton lets the compiler fuse a product into a
    following add (one FMA, one rounding), which the reference's separate PyTorch kernels never do: a
    product the reference rounds before adding must go through here to match it bit for bit. PTX's
    ``mul.rn`` is never contracted; NumPy (the interpreter) never fuses."""
    if INTERPRETED:
        return a * b
    else:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def dot(x, w, acc, IEEE_DOT: tl.constexpr):
    """acc + x @ w^T, operands in the compute dtype. IEEE_DOT: exact float32 products of the rounded
    operands (float32 compute, or the interpreter)."""
    if IEEE_DOT:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


def cdiv(a, b):
    """``ceil(a / b)`` for the host side of a launch (grids, splits): ``triton.cdiv``'s formula without
    its constexpr wrapper, which costs about 3 us a call on the host (a launch computes several) against
    0.1 us. Works on a ``torch.SymInt`` too (torch.compile with dynamic shapes)."""
    return (a + b - 1) // b


def ieee_dot(compute_dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` must take float32 operands with IEEE products: for float32 compute (Triton
    would use tf32 otherwise), and under ``TRITON_INTERPRET=1``, whose bf16 ``tl.dot`` is unusable."""
    return compute_dtype == torch.float32 or INTERPRETED.value


def autotuning(autotune: bool, config: triton.Config | None) -> bool:
    """Whether a launcher runs its autotuned kernel: asked for, no config given, and on a GPU. The
    interpreter (TRITON_INTERPRET=1) runs the first config: timing NumPy says nothing of a GPU, and
    Triton 3.9's autotuner finds no benchmarker without a GPU driver ("0 active drivers")."""
    return autotune and config is None and not INTERPRETED.value


def chosen_config(configs: list[triton.Config], config: triton.Config | None, kernel: str) -> triton.Config:
    """``config`` if it is one of the kernel's kind (same parameters), else the first of ``configs``:
    what an untuned launch runs (benchmarks sweep configs through it)."""
    if config is None:
        return configs[0]
    if set(config.kwargs) != set(configs[0].kwargs):
        raise ValueError(f"the {kernel} takes configs with {sorted(configs[0].kwargs)}, got {config}")
    return config


def m_bucket(m: int) -> int:
    """M rounded up to a power of two: the autotuners tune per bucket, not per M. A symbolic M (torch.compile
    with dynamic shapes) stays symbolic: Inductor tunes such a launch itself, once per graph, and a
    bucket would guard on M, recompiling for every power of two."""
    if isinstance(m, torch.SymInt):
        return m
    return 1 << max(m - 1, 0).bit_length()


def prune_gemm_configs(configs, named_args, **kwargs):
    """Tiles no taller than M (rounded up to a power of two, at least 16) and at least a quarter of it
    (or the tallest there are): fewer configs to compile and time. A tile of M / 8 rows or fewer
    reads or dequantizes each weight eight times or more: at M = 128 a 16-row 4-bit tile issues more
    than bf16 takes to read the weight. All of them for a symbolic M (pruning would guard on it)."""
    if not isinstance(named_args["M_BUCKET"], int):
        return configs
    m_bucket = max(named_args["M_BUCKET"], 16)
    shortest = min(m_bucket // 4, max(c.kwargs["BLOCK_M"] for c in configs))
    return [c for c in configs if shortest <= c.kwargs["BLOCK_M"] <= m_bucket]


# Split-K of the GEMM for small M (at most GEMM_SPLIT_MAX_M rows: one or two row tiles), where the
# output tiles alone leave SMs idle or too few warps per SM to hide latency: aim at 512 programs per
# 128 output columns' tiles (about 4 four-warp programs per SM on an H100), in K slices of whole
# 128-column steps (a multiple of every BLOCK_K), at least 512 columns each.
GEMM_SPLIT_MAX_M = 128
GEMM_TARGET_PROGRAMS = 512
GEMM_SPLIT_STEP = 128


def split_evenly(length: int, wanted: int, most: int, step: int = 1) -> tuple[int, int]:
    """(number of splits, length per split) cutting ``length`` into about ``wanted`` (at most ``most``,
    at least one) slices of a whole number of ``step``s; the last slice may be shorter."""
    splits = max(1, min(most, wanted))
    if splits == 1:
        return 1, length
    per_split = cdiv(cdiv(length, splits), step) * step
    return cdiv(length, per_split), per_split


def gemm_split(m: int, out_features: int, in_features: int, wanted: int | None = None) -> tuple[int, int]:
    """(number of K splits, columns per split) of the GEMM for M rows of x and a weight shape. Depends
    on M only through M <= GEMM_SPLIT_MAX_M, so a symbolic M (torch.compile with dynamic shapes)
    guards once. ``wanted`` overrides the heuristic's number of splits (benchmarks sweep it)."""
    if wanted is not None:
        return split_evenly(in_features, wanted, most=max(1, in_features // GEMM_SPLIT_STEP), step=GEMM_SPLIT_STEP)
    if m == 0 or m > GEMM_SPLIT_MAX_M:
        return 1, in_features
    wanted = cdiv(GEMM_TARGET_PROGRAMS, cdiv(out_features, 128))
    return split_evenly(in_features, wanted, most=in_features // 512, step=GEMM_SPLIT_STEP)


def sum_partials(partial: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """float32 partial sums [splits, M, N] -> [M, N] in compute_dtype, bias added in float32 (in a fixed
    order: deterministic, no atomics). Under torch.compile, Inductor fuses this with its neighbours."""
    out = partial.sum(0)
    if bias is not None:
        out = out + bias.to(compute_dtype).float()
    return out.to(compute_dtype)
