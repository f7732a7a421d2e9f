"""torch.compile's on-disk caches are keyed by the qpass op bodies (kernels/compile_cache.py)."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from qpass.kernels import compile_cache

# One process compiling a small NF4 layer for inference (3 rows: Inductor traces the op body's fused
# decoding, reference_4bit.linear_4bit_rows) with the cache folder given; with "edited", the body is
# changed in memory (twice the result) and the tag is computed from a copy of the sources with one
# line added, as after an upgrade or an edit. Prints the compiled result and the cache counters.
_PROCESS = textwrap.dedent("""
    import json, shutil, sys, tempfile
    from pathlib import Path
    import torch
    import qpass
    from qpass.kernels import compile_cache, reference_4bit
    from torch._dynamo.utils import counters

    if sys.argv[1] == "edited":
        body = reference_4bit.linear_4bit_rows
        reference_4bit.linear_4bit_rows = lambda *args: 2 * body(*args)
        sources = Path(tempfile.mkdtemp()) / "kernels"
        shutil.copytree(compile_cache._SOURCES, sources)
        with open(sources / "reference_4bit.py", "a") as f:
            f.write("# edited\\n")
        compile_cache.tag_compile_caches(sources)
    torch.manual_seed(0)
    model = qpass.quantize(torch.nn.Sequential(torch.nn.Linear(64, 32)), "nf4")
    with torch.no_grad():
        out = torch.compile(model)(torch.randn(3, 64))
    print(json.dumps({"out": out.tolist(), "aot": dict(counters["aot_autograd"])}))
""")


def _compile_in_a_process(cache_dir, mode):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    result = subprocess.run([sys.executable, "-c", _PROCESS, mode], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return torch.tensor(report["out"]), report["aot"]


def test_a_changed_op_body_is_compiled_again_not_loaded_from_the_cache(tmp_path):
    """AOTAutograd's cache keys a graph by the qpass node, not by the op body traced into it: without the
    tag, a process whose op body changed loaded the code compiled from the old one. With the tag, the
    same sources hit the cache (so caching still works) and changed sources compile anew."""
    first, first_counters = _compile_in_a_process(tmp_path, "same")
    assert first_counters.get("autograd_cache_saved") == 1, first_counters
    again, again_counters = _compile_in_a_process(tmp_path, "same")
    assert again_counters.get("autograd_cache_hit") == 1, again_counters
    assert torch.equal(again, first)
    edited, edited_counters = _compile_in_a_process(tmp_path, "edited")
    assert edited_counters.get("autograd_cache_hit") is None, edited_counters
    assert torch.equal(edited, 2 * first)


def test_the_tag_follows_the_sources_and_keeps_the_users_tag(tmp_path):
    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(f"# {name}\n")
    digest = compile_cache.source_digest(tmp_path)
    assert compile_cache.source_digest(tmp_path) == digest
    (tmp_path / "notes.txt").write_text("not a source")
    assert compile_cache.source_digest(tmp_path) == digest
    (tmp_path / "b.py").write_text("# b.py, edited\n")
    assert compile_cache.source_digest(tmp_path) != digest

    with torch.compiler.config.patch(cache_key_tag="mine+qpass-kernels-0123456789abcdef"):
        tag = compile_cache.tag_compile_caches(tmp_path)
        expected = f"mine+qpass-kernels-{compile_cache.source_digest(tmp_path)}"
        assert tag == torch.compiler.config.cache_key_tag == expected


def test_importing_qpass_tags_the_compile_caches():
    assert torch.compiler.config.cache_key_tag.endswith(
        compile_cache.TAG_PREFIX + compile_cache.source_digest())
