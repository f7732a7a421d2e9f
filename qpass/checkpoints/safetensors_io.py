"""Reading and writing safetensors checkpoint folders (single file or sharded). Never pickle."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class SafetensorsReader:
    """Tensors of a checkpoint folder by key, read lazily one at a time onto ``device`` (safetensors
    copies each straight from the file to a GPU)."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such checkpoint folder")
        if (self.folder / INDEX).is_file():
            try:
                weight_map = json.loads((self.folder / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{self.folder / INDEX}: not a safetensors index ({err})") from err
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        elif any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise CheckpointError(f"{self.folder}: only pickle (.bin/.pt) weights here; qpass reads safetensors "
                                  "only and never unpickles. Convert the checkpoint to safetensors first")
        else:
            raise CheckpointError(f"{self.folder}: no {SINGLE} or {INDEX}")
        self._handles = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {INDEX} but missing")
            try:
                self._handles[name] = safe_open(str(path), framework="pt", device=str(device))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: cannot read it ({err}); the file is truncated or corrupted") from err
        self.key_to_file = weight_map or {key: SINGLE for key in self._handles[SINGLE].keys()}
        for key, name in self.key_to_file.items():
            if key not in self._handles[name].keys():
                raise CheckpointError(f"{self.folder / name}: tensor {key!r} is listed in {INDEX} but not in the file")

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def suffixes_under(self, module: str) -> set[str]:
        """The key suffixes stored under ``module`` (``weight``, ``weight.absmax``, ...)."""
        return {key[len(module) + 1 :] for key in self.key_to_file if key.startswith(module + ".")}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.key_to_file:
            raise CheckpointError(f"{self.folder}: tensor {key!r} is missing from the checkpoint")
        name = self.key_to_file[key]
        try:
            return self._handles[name].get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"{self.folder / name}: cannot read tensor {key!r} ({err}); the file is corrupted") from err


def write_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | str) -> None:
    """Write ``tensors`` into ``folder`` as one file or shards plus an index, as transformers does."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size,
                                               filename_pattern="model{suffix}.safetensors")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target`` by renames, so an
    interrupted save leaves ``target`` as it was (or absent) and never half written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as err:
        raise CheckpointError(f"{target}: writing the checkpoint failed ({err}); nothing was replaced") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
