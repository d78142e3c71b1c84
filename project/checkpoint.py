"""Loading a trained model (and its tokenizer) from a single-file checkpoint for inference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from project.config import ModelConfig
from project.io import read_checkpoint
from project.model import Transformer


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
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
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
