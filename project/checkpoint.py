"""Checkpoints, the one place that reads, writes, consolidates and loads them.

    python -m project.checkpoint consolidate RUN/checkpoints/last.ckpt OUT.ckpt
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from project.config import ModelConfig, UserError
from project.model import Transformer

log = logging.getLogger(__name__)

# The LightningModule holds the Transformer as `self.model`, so its weights are saved under this prefix.
STATE_PREFIX = "model."
# A checkpoint's own record of its contents: {"algorithm": "sha256", "digest": hex}, checked on every read.
CHECKSUM_KEY = "jtok_checksum"


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: unreadable, corrupt, sharded where a file is needed, or not ours."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist."""


def _leaves(obj: Any, name: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor and plain value (str, number, bool, None) of a checkpoint, with its path, in stored order.
    Other objects are skipped: their repr may not survive a save and load unchanged."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if not (name == "" and key == CHECKSUM_KEY):
                yield from _leaves(value, f"{name}/{key if isinstance(key, (str, int)) else type(key).__name__}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            yield from _leaves(value, f"{name}/{index}")
    elif obj is None or isinstance(obj, (str, bytes, bool)):
        yield name, obj
    elif isinstance(obj, (int, float)):  # numpy scalars too, by value (their repr changes across numpy versions)
        yield name, float(obj) if isinstance(obj, float) else int(obj)


def checksum(checkpoint: Mapping[str, Any]) -> str:
    """sha256 over a checkpoint's tensors (path, dtype, shape and bytes) and plain values."""
    digest = hashlib.sha256()
    for name, value in _leaves(checkpoint):
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\n".encode())
            digest.update(memoryview(data))
        else:
            digest.update(f"{name}={value!r}\n".encode())
    return digest.hexdigest()


def with_checksum(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of `checkpoint` that carries the checksum of its contents."""
    return {**checkpoint, CHECKSUM_KEY: {"algorithm": "sha256", "digest": checksum(checkpoint)}}


def verify_checksum(checkpoint: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose contents differ from the checksum written with it."""
    recorded = checkpoint.get(CHECKSUM_KEY)
    if recorded is None:
        log.warning("checkpoint %s carries no checksum (written before checksums existed): it cannot be verified", path)
        return
    if not isinstance(recorded, Mapping) or recorded.get("digest") != checksum(checkpoint):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its contents do not match the checksum written with it (the file "
            f"changed after it was saved). Resume or evaluate from another checkpoint (an earlier step*.ckpt), "
            f"or retrain."
        )


def _fsync(path: Path) -> None:
    """Flush a written file to disk, so that a rename after it never exposes an empty file after a crash."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but each file carries a checksum of its contents, is written to a temporary
    file renamed into place (never half-written; the temporary file is removed if the write fails) and is verified
    when Lightning reads it back to resume."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            super().save_checkpoint(with_checksum(checkpoint), tmp, storage_options)
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location or "cpu", jtok_only=False)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the `.NAME.tmp` files a killed write leaves behind (nothing reads them); return them."""
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", jtok_only: bool = True) -> dict[str, Any]:
    """Load a single-file Lightning checkpoint and verify its checksum, with a clear error naming the file if it is
    missing, unreadable, corrupt or (with `jtok_only`) not a checkpoint of this project."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a sharded (distributed) checkpoint folder; consolidate it first: "
            f"python -m project.checkpoint consolidate {path} OUT.ckpt"
        )
    if not path.is_file():
        raise MissingCheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a readable PyTorch checkpoint (not a torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt archives
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (it holds a {type(ckpt).__name__})")
    verify_checksum(ckpt, path)
    if jtok_only and ("state_dict" not in ckpt or "hyper_parameters" not in ckpt):
        raise CheckpointError(
            f"checkpoint {path} is not a jtok Lightning checkpoint (no state_dict / hyper_parameters)"
        )
    return ckpt


def model_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Transformer's own state dict out of the LightningModule's."""
    return {k[len(STATE_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(STATE_PREFIX)}


@dataclass
class LoadedModel:
    """A model in eval mode with the tokenizer it was trained with."""

    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    checkpoint: dict


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer_path: str | None = None) -> LoadedModel:
    """Rebuild the Transformer from a Lightning checkpoint written by this project."""
    ckpt = read_checkpoint(path)
    cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    model = Transformer(cfg)
    model.load_state_dict(model_state(ckpt["state_dict"]))
    if tokenizer_path is not None:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    elif ckpt.get("tokenizer_json"):
        tokenizer = Tokenizer.from_str(ckpt["tokenizer_json"])
    else:
        raise CheckpointError(f"checkpoint {path} carries no tokenizer; pass tokenizer_path=")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary in {path} "
            f"is {cfg.vocab_size}"
        )
    return LoadedModel(model.to(device).eval(), tokenizer, cfg, {k: v for k, v in ckpt.items() if k != "state_dict"})


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A folder written by distributed checkpointing (Lightning's sharded format)."""
    path = Path(path)
    return path.is_dir() and (path / "meta.pt").is_file()


def consolidate(folder: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Merge a sharded checkpoint folder into one file loadable on a single device (and by eval).

    Runs in one process without a process group; it needs the full model in CPU memory."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder, out_file = Path(folder), Path(out_file)
    if not is_sharded_checkpoint(folder):
        raise CheckpointError(f"{folder} is not a sharded checkpoint folder (no meta.pt inside)")
    checkpoint = _load_distributed_checkpoint(folder)
    # Optimizer states stay in the folder: the consolidated file is for evaluation and fine-tuning.
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("optimizer_")}
    AtomicCheckpointIO().save_checkpoint(checkpoint, out_file)
    return out_file


def single_file_checkpoint(path: str | os.PathLike) -> Path:
    """`path` itself for a single-file checkpoint; for a sharded folder, its consolidated sibling
    `<name>.consolidated.ckpt` (written once, rewritten when the folder is newer)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        return path
    out = path.with_name(path.stem + ".consolidated.ckpt")
    if not out.is_file() or out.stat().st_mtime < (path / "meta.pt").stat().st_mtime:
        consolidate(path, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m project.checkpoint", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser("consolidate", help="merge a sharded checkpoint folder into one .ckpt file")
    cons.add_argument("folder")
    cons.add_argument("out_file")
    args = parser.parse_args(argv)
    print(consolidate(args.folder, args.out_file))


if __name__ == "__main__":
    main()
