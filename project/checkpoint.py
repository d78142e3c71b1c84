"""Checkpoints, the one place that reads, writes, consolidates and loads them.

    python -m project.checkpoint consolidate RUN/checkpoints/last.ckpt OUT.ckpt
"""

from __future__ import annotations

import argparse
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from project.config import ModelConfig
from project.model import Transformer

# The LightningModule holds the Transformer as `self.model`, so its weights are saved under this prefix.
STATE_PREFIX = "model."


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but saving to a temporary file renamed into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load a single-file Lightning checkpoint, with a clear error if it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a sharded (distributed) checkpoint folder; consolidate it first: "
            f"python -m project.checkpoint consolidate {path} OUT.ckpt"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint (not a torch.save zip archive)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except Exception as exc:  # torch raises many types for corrupt archives
        raise ValueError(f"checkpoint {path} is unreadable: {exc}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a jtok Lightning checkpoint (no state_dict / hyper_parameters)")
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
        raise ValueError(f"checkpoint {path} carries no tokenizer; pass tokenizer_path=")
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocabulary is {cfg.vocab_size}"
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
        raise ValueError(f"{folder} is not a sharded checkpoint folder (no meta.pt inside)")
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
