"""The pre-tokenised folder's layout (`python -m project.data.pretokenize` writes it, `data=tokens` reads it) and
the checks a reader runs on its manifest, tokenizer and shards before use.

The folder holds `tokenizer.json`, the shards `train-NNNNN.bin` / `val-NNNNN.bin` (flat token ids, each document
followed by EOS, as in the data cache) and `manifest.json`, written last, which lists every shard with its token
and document counts, size and BLAKE2b checksum; while the pre-tokeniser runs, `progress.json` records the shards
finished so far."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from project.config import UserError
from project.data.cache import DamagedCache, check_file
from project.data.source import SPLITS, MissingDataError

MANIFEST = "manifest.json"
PROGRESS = "progress.json"  # the pre-tokeniser's record of finished shards; removed once the manifest is written
TOKENIZER = "tokenizer.json"
FORMAT = "jtok-pretokenized"
FORMAT_VERSION = 1


class PretokenizedDataError(UserError, ValueError):
    """A pre-tokenised folder that is unfinished, damaged, or made with another tokenizer (the message says which)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_manifest(folder: str | Path, verify_checksums: bool = True) -> dict[str, Any]:
    """The folder's manifest, after checking it, its tokenizer.json and every shard it lists (sizes always,
    BLAKE2b checksums with `verify_checksums`). Raises MissingDataError or PretokenizedDataError naming the file."""
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise MissingDataError(f"pre-tokenised folder {folder} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / PROGRESS).is_file():
            raise PretokenizedDataError(
                f"{folder}: pre-tokenisation has not finished (no {MANIFEST}, but a {PROGRESS}): rerun the same "
                "`python -m project.data.pretokenize` command to resume it"
            )
        raise PretokenizedDataError(
            f"{folder}: no {MANIFEST}; not a pre-tokenised folder (make one with `python -m project.data.pretokenize "
            f"--input FILES --tokenizer TOKENIZER --out {folder}`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PretokenizedDataError(f"{path} is not valid JSON ({e}); pre-tokenise again into a new folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PretokenizedDataError(f'{path} is not a pre-tokenised manifest (no "format": "{FORMAT}")')
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PretokenizedDataError(f"{path} is format version {manifest.get('format_version')}, not {FORMAT_VERSION}")
    missing = [k for k in ("plan", "tokenizer", "dtype", "splits") if k not in manifest]
    missing += [f"splits.{s}" for s in SPLITS if s not in (manifest.get("splits") or {})]
    if missing:
        raise PretokenizedDataError(f"{path} lacks {', '.join(missing)}")
    try:
        _check_tokenizer(folder, manifest["tokenizer"])
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            record = manifest["splits"][split]
            if record["tokens"] < 1:
                raise PretokenizedDataError(f"{path}: the {split} split is empty (no tokens)")
            if sum(s["tokens"] for s in record["shards"]) != record["tokens"]:
                raise PretokenizedDataError(f"{path}: the {split} shards' tokens do not add up to {record['tokens']}")
            for shard in record["shards"]:
                _check_shard(folder / shard["name"], shard, itemsize, verify_checksums)
    except (KeyError, TypeError) as e:
        raise PretokenizedDataError(f"{path} is malformed ({type(e).__name__}: {e})") from None
    return manifest


def _check_tokenizer(folder: Path, record: Mapping[str, Any]) -> None:
    path = folder / TOKENIZER
    if not path.is_file():
        raise PretokenizedDataError(
            f"{path} is missing: the shards cannot be decoded without the tokenizer they were made with"
        )
    digest = sha256_file(path)
    if digest != record.get("sha256"):
        raise PretokenizedDataError(
            f"{path} (sha256 {digest[:12]}...) is not the tokenizer the shards were made with (the manifest records "
            f"sha256 {str(record.get('sha256'))[:12]}...): restore it or pre-tokenise again"
        )


def _check_shard(path: Path, record: Mapping[str, Any], itemsize: int, verify_checksums: bool) -> None:
    if record["bytes"] != record["tokens"] * itemsize:
        raise PretokenizedDataError(
            f"{path}: the manifest records {record['bytes']} bytes for {record['tokens']} tokens"
        )
    try:
        if verify_checksums:
            check_file(path, record)
        elif not path.is_file() or path.stat().st_size != record["bytes"]:
            raise DamagedCache(f"{path} is missing or does not have the {record['bytes']} bytes the manifest records")
    except DamagedCache as e:
        raise PretokenizedDataError(f"{e}; pre-tokenise again (into a new folder) to replace it") from None


def content_digest(manifest: Mapping[str, Any]) -> str:
    """The data's identity by content (tokenizer and every shard's checksum), whatever folder it sits in."""
    shards = {s: [r["blake2b"] for r in manifest["splits"][s]["shards"]] for s in SPLITS}
    key = {"tokenizer": manifest["tokenizer"]["sha256"], "shards": shards}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
