"""Export a jtok checkpoint to a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    python -m project.export_hf RUN/checkpoints/last.ckpt OUT_DIR [--overwrite]

baseline becomes a LlamaForCausalLM and moe a GraniteMoeShared / Glm4Moe model where one computes exactly what
ours does (targets.py); JTok, JTok-M and the other MoE models a remote-code JTokForCausalLM (this package's
modeling_jtok.py and configuration_jtok.py, copied into OUT_DIR: load with `trust_remote_code=True`). The
tokenizer is saved as a PreTrainedTokenizerFast with `<|endoftext|>` as EOS (and BOS). OUT_DIR is written as a
whole or not at all: into a temporary folder beside it, renamed into place at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer

from project.checkpoint import load_model, single_file_checkpoint
from project.config import USER_ERROR, UserError
from project.data.tokenizer import EOS, eos_id
from project.export_hf.targets import Target, choose
from project.io import default_file_mode

class ExportError(UserError, ValueError):
    """An export that cannot start: the output folder is in the way."""


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder unless `overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out_dir} exists and is not empty; pass --overwrite to replace it")


def hf_tokenizer(tokenizer: Tokenizer, max_seq_len: int):
    """The trained tokenizer as a PreTrainedTokenizerFast; EOS also serves as BOS (it separates documents)."""
    from transformers import PreTrainedTokenizerFast

    eos_id(tokenizer)  # a clear error for a vocabulary without EOS
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.to_str()),
        eos_token=EOS,
        bos_token=EOS,
        model_max_length=max_seq_len,
        clean_up_tokenization_spaces=False,  # decode(encode(s)) == s, as with the tokenizer the model trained on
    )


def hf_model(target: Target):
    """The transformers model of `target` holding its weights (built on the meta device: no second init)."""
    import transformers

    from project.export_hf import configuration_jtok, modeling_jtok

    if target.remote_code:
        config_class, model_class = configuration_jtok.JTokConfig, modeling_jtok.JTokForCausalLM
        # save_pretrained then copies both source files into the folder and writes `auto_map` in config.json.
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")
    else:
        model_class = getattr(transformers, target.class_name)
        config_class = model_class.config_class
    config = config_class(**target.config)
    with torch.device("meta"):
        model = model_class(config)
    missing, unexpected = model.load_state_dict(target.state, strict=False, assign=True)
    if unexpected or set(missing) != ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"{target.class_name} weight names do not match: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()  # the head becomes the embedding (saved once)
    return model.eval()


def _finish_files(folder: Path) -> None:
    """Give `folder` and its files the modes a plain mkdir/open would (temporary folders and files are private),
    and flush the files to disk, so the rename never exposes an empty file after a crash."""
    file_mode = default_file_mode()
    folder.chmod(file_mode | (file_mode & 0o444) >> 2)  # folders: searchable wherever readable (0644 -> 0755)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(file_mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder `tmp` to `out_dir`, replacing what is there (restored if the rename fails)."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
    os.replace(out_dir, old / "previous")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old / "previous", out_dir)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Target:
    """Write the Hugging Face export of `checkpoint` (a .ckpt file or a sharded folder) to `out_dir`."""
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir, overwrite)
    loaded = load_model(single_file_checkpoint(checkpoint))
    target = choose(loaded.config, loaded.model.state_dict(), eos_id(loaded.tokenizer))
    model = hf_model(target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp)
        hf_tokenizer(loaded.tokenizer, loaded.config.max_seq_len).save_pretrained(tmp)
        _finish_files(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m project.export_hf", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a jtok checkpoint: RUN/checkpoints/last.ckpt or a sharded folder")
    parser.add_argument("out_dir", help="the folder to write (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty out_dir")
    args = parser.parse_args(argv)
    try:
        target = export(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(USER_ERROR) from None
    how = ", trust_remote_code=True" if target.remote_code else ""
    print(f"wrote {target.class_name} to {args.out_dir}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(args.out_dir)!r}{how})")  # fmt: skip
