"""Checkpoints named by Hugging Face Hub repository id. Nothing is downloaded: the repository lies in a
Hub cache made on disk, read with HF_HUB_OFFLINE=1 in a fresh process (huggingface_hub reads its
environment when imported), as a user without a network reads what they fetched before."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qpass

from models import tiny_llama

REPO = "qpass-tests/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = [[5, 17, 99, 3, 64]]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding REPO at COMMIT, the main branch (huggingface_hub's cache layout)."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    tiny_llama().save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def _offline(code_or_args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent)


def test_from_pretrained_by_repository_id(hub_cache):
    code = f"""
import torch, qpass
from models import tiny_llama
model = qpass.from_pretrained({REPO!r}, "nf4")
expected = qpass.quantize(tiny_llama(), "nf4")
with torch.no_grad():
    assert torch.equal(model(torch.tensor({IDS})).logits, expected(torch.tensor({IDS})).logits)
at_commit = qpass.from_pretrained({REPO!r}, "nf4", revision={COMMIT!r})
assert isinstance(at_commit.model.layers[0].mlp.up_proj, qpass.QuantizedLinear)
# qpass.estimate fetches config.json alone; its default dtype for what stays in full precision is float16
in_fp16 = qpass.quantize(tiny_llama().half(), "nf4")
assert qpass.estimate({REPO!r}, "nf4").total_bytes == qpass.footprint(in_fp16).total_bytes
"""
    out = _offline(["-c", code], hub_cache)
    assert out.returncode == 0, out.stderr


def test_cli_quantizes_and_estimates_by_repository_id(hub_cache, tmp_path):
    cli = ["-m", "qpass.cli"]
    out = _offline([*cli, "quantize", REPO, "--format", "nf4", "--out", str(tmp_path / "q"), "--quiet"], hub_cache)
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        ids = torch.tensor(IDS)
        assert torch.equal(qpass.from_pretrained(tmp_path / "q")(ids).logits,
                           qpass.quantize(tiny_llama(), "nf4")(ids).logits)
    out = _offline([*cli, "estimate", REPO, "--format", "nf4"], hub_cache)
    assert out.returncode == 0, out.stderr
    snapshot = hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert str(qpass.estimate(snapshot, "nf4")) in out.stdout


def test_a_repository_not_in_reach_is_a_clear_error(hub_cache):
    out = _offline([*["-m", "qpass.cli"], "quantize", "qpass-tests/absent", "--format", "nf4", "--out", "unused"],
                   hub_cache)
    assert out.returncode == 2
    assert "qpass-tests/absent: no such checkpoint folder, and the Hugging Face Hub repository" in out.stderr
    assert "HF_HUB_OFFLINE" in out.stderr  # huggingface_hub's reason: offline, and not in the cache
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("name", ["no/such/local/folder", "not a repository"])
@pytest.mark.parametrize("read", [qpass.from_pretrained, lambda name: qpass.estimate(name, "nf4")],
                         ids=["from_pretrained", "estimate"])
def test_a_name_that_is_neither_folder_nor_repository_id(name, read):
    with pytest.raises(qpass.CheckpointError, match="no such checkpoint folder, and not a Hugging Face Hub repository"):
        read(name)


def test_revision_of_a_local_folder_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    with pytest.raises(qpass.CheckpointError, match="a local folder has no revisions"):
        qpass.from_pretrained(tmp_path / "fp", "nf4", revision="main")
