"""Tokenise a corpus once into sharded token files for `data=tokens`: several processes, a progress bar, resumable.

    python -m project.data.pretokenize --input 'corpus/*.jsonl' --tokenizer tokenizer.json --out DIR --workers 8
    python -m project.data.pretokenize --hf HuggingFaceFW/fineweb-edu --hf-config sample-10BT --tokenizer bpe:32000 ...
    python run.py data=tokens data.path=DIR

One process reads the documents in order and cuts them into pieces of at most 256K characters at whitespace;
`--workers` processes encode bounded batches of pieces; the reader writes the ids in input order (so the output is
the same for any number of workers), each document followed by EOS as in the data cache. A document goes to val when
a hash of its text falls under `--val-fraction`. Shards of about `--shard-tokens` tokens end at document ends and are
renamed into place and recorded in progress.json together; a rerun of the same command after a kill resumes after
the last recorded shards. manifest.json is written last."""

from __future__ import annotations

import argparse
import collections
import fcntl
import json
import logging
import multiprocessing
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from project.config import USER_ERROR, ConfigError, UserError
from project.data.cache import token_dtype
from project.data.inputs import FileInputs, HFInputs, Inputs, documents_from, split_of
from project.data.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    TOKENIZER,
    PretokenizedDataError,
    load_manifest,
    sha256_file,
)
from project.data.shards import ShardWriter, encode_in_worker, encode_pieces, init_worker, piece_batches
from project.data.source import SPLITS, check_fraction
from project.data.text import ENCODING_ERRORS
from project.data.tokenizer import (
    MAX_PIECE_CHARS, document_pieces, eos_id, load_tokenizer, train_tokenizer, vocab_size_of,
)
from project.io import atomic_write_bytes, atomic_write_json

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB of uint16: few files for 10B tokens, little redone after a kill
IN_FLIGHT_PER_WORKER = 2  # encode batches queued per worker: keeps them busy, bounds the reader's memory
log = logging.getLogger(__name__)


def pretokenize(inputs: Inputs, tokenizer: str, out: str | Path, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                workers: int = 1, val_fraction: float = 0.01, tokenizer_documents: int = 100_000,
                min_frequency: int = 2, progress_bar: bool = True) -> dict[str, Any]:  # fmt: skip
    """Write (or finish) the pre-tokenised folder `out` and return its manifest. `tokenizer` is a tokenizer.json
    path, or `bpe:VOCAB` to train a byte-level BPE on the first `tokenizer_documents` training documents.
    With `workers` > 1, a script calling this must do so under `if __name__ == "__main__":` (the worker processes
    import the main module, as multiprocessing's forkserver and spawn do)."""
    check_fraction(val_fraction)
    if shard_tokens < 1 or workers < 1:
        raise ConfigError(f"--shard-tokens and --workers must be >= 1, got {shard_tokens} and {workers}")
    folder = Path(out).expanduser().absolute()
    folder.mkdir(parents=True, exist_ok=True)
    spec = tokenizer_spec(tokenizer, tokenizer_documents, min_frequency)
    plan = json.loads(json.dumps({"format_version": FORMAT_VERSION, "inputs": inputs.describe(), "tokenizer": spec,
                                  "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                                  "piece_chars": MAX_PIECE_CHARS}))  # fmt: skip
    with exclusive(folder):
        if (folder / MANIFEST).is_file():
            manifest = load_manifest(folder, verify_checksums=False)
            check_same_plan(folder, manifest.get("plan"), plan)
            (folder / PROGRESS).unlink(missing_ok=True)  # left by a kill between the manifest and its removal
            log.info("%s is already complete", folder)
            return manifest
        progress = resume_progress(folder, plan)
        if progress is None:
            atomic_write_bytes(folder / TOKENIZER, tokenizer_file(spec, tokenizer, inputs, val_fraction))
            progress = {"plan": plan, "tokenizer_sha256": sha256_file(folder / TOKENIZER), "checkpoints": []}
            atomic_write_json(folder / PROGRESS, progress)
        tok = load_tokenizer(folder / TOKENIZER)
        vocab_size = vocab_size_of(tok)
        dtype = token_dtype(vocab_size)
        writer = ShardWriter(folder, progress, dtype, eos_id(tok), shard_tokens)
        start = time.perf_counter()
        encode_all(inputs, tok, writer, val_fraction, workers, progress_bar)
        manifest = write_manifest(folder, progress, plan, vocab_size, eos_id(tok), dtype)
        splits = manifest["splits"]
        log.info("%s: %d train and %d val tokens in %d shard checkpoints (%.0f s)", folder, splits["train"]["tokens"],
                 splits["val"]["tokens"], len(progress["checkpoints"]), time.perf_counter() - start)  # fmt: skip
        return manifest


def tokenizer_spec(tokenizer: str, documents: int, min_frequency: int) -> dict[str, Any]:
    """The plan's record of the tokenizer: a file by its content, or the settings of the one to train."""
    if tokenizer.startswith("bpe:"):
        try:
            vocab_size = int(tokenizer[4:])
        except ValueError:
            raise ConfigError(f"--tokenizer {tokenizer!r}: expected bpe:VOCAB_SIZE, e.g. bpe:32000") from None
        if vocab_size < 1 or documents < 1 or min_frequency < 1:
            raise ConfigError("--tokenizer bpe:V, --tokenizer-documents and --min-frequency must be >= 1")
        return {"train": {"vocab_size": vocab_size, "documents": documents, "min_frequency": min_frequency}}
    path = Path(tokenizer).expanduser()
    if not path.is_file():
        raise ConfigError(f"--tokenizer {tokenizer!r} is neither a tokenizer.json file nor bpe:VOCAB_SIZE")
    load_tokenizer(path)  # a clear error now for a file that is not a tokenizer with EOS
    return {"sha256": sha256_file(path)}


def tokenizer_file(spec: dict[str, Any], tokenizer: str, inputs: Inputs, val_fraction: float) -> bytes:
    """The folder's tokenizer.json: the given file's bytes, or a BPE trained on the first training documents."""
    settings = spec.get("train")
    if settings is None:
        return Path(tokenizer).expanduser().read_bytes()

    def train_documents() -> Iterator[str]:
        count = 0
        for _, document in documents_from(inputs):
            if split_of(document, val_fraction) == "train":
                yield document
                count += 1
                if count == settings["documents"]:
                    return

    log.info("training a %d-token byte-level BPE on up to %d training documents", settings["vocab_size"],
             settings["documents"])  # fmt: skip
    trained = train_tokenizer(document_pieces(train_documents()), settings["vocab_size"], settings["min_frequency"])
    return trained.to_str(pretty=True).encode()


def encode_all(inputs: Inputs, tokenizer: Tokenizer, writer: ShardWriter, val_fraction: float, workers: int,
               progress_bar: bool) -> None:  # fmt: skip
    """Read from the last checkpoint on, encode (in `workers` processes, at most a few batches each in flight) and
    write in input order; a final checkpoint closes the last shards."""
    checkpoints = writer.progress["checkpoints"]
    start = tuple(checkpoints[-1]["position"]) if checkpoints else (0, 0)
    done = sum(s["tokens"] for c in checkpoints for s in c["shards"].values())
    bar = tqdm(desc="pretokenize", unit="tok", unit_scale=True, initial=done, disable=not progress_bar, delay=1.0)
    batches = piece_batches(documents_from(inputs, start), val_fraction)
    last = None
    with worker_pool(tokenizer, writer.dtype, workers) as pool:
        pending: collections.deque[tuple[list, Future | list[np.ndarray]]] = collections.deque()
        for items, texts in batches:
            firsts = [first for _, first, _, _ in items]
            if pool is None:
                pending.append((items, encode_pieces(tokenizer, texts, firsts, writer.dtype)))
            else:
                pending.append((items, pool.submit(encode_in_worker, texts, firsts)))
            while pending and (pool is None or len(pending) > IN_FLIGHT_PER_WORKER * workers):
                last = write_next(pending, writer, bar)
        while pending:
            last = write_next(pending, writer, bar)
    bar.close()
    if writer.pending:
        writer.checkpoint(last)


def write_next(pending: collections.deque, writer: ShardWriter, bar: tqdm) -> tuple[int, int]:
    """Write the oldest batch (waiting for its worker); return the input position after its last piece."""
    items, result = pending.popleft()
    ids = result.result() if isinstance(result, Future) else result
    bar.update(writer.write(items, ids))
    bar.set_postfix(shards=writer.index, refresh=False)
    return items[-1][3]


@contextmanager
def worker_pool(tokenizer: Tokenizer, dtype: np.dtype, workers: int):
    """`workers` encoding processes (None for one: encode in this process, with the tokenizer's own threads).
    forkserver: workers start from a clean process, not a fork of one that already ran the tokenizer's threads."""
    if workers == 1:
        yield None
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([init_worker.__module__])  # imported once, in the server, not once per worker
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                             initargs=(tokenizer.to_str(), dtype.name)) as pool:  # fmt: skip
        yield pool


def write_manifest(folder: Path, progress: dict[str, Any], plan: dict[str, Any], vocab_size: int, eos: int,
                   dtype: np.dtype) -> dict[str, Any]:  # fmt: skip
    """manifest.json (last, atomically) from the recorded checkpoints; refused if a split came out empty."""
    splits = {}
    for split in SPLITS:
        shards = [c["shards"][split] for c in progress["checkpoints"] if split in c["shards"]]
        splits[split] = {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                         "shards": shards}  # fmt: skip
        if not shards:
            raise PretokenizedDataError(
                f"no document of the input fell into the {split} split (val_fraction={plan['val_fraction']}); "
                f"remove {folder} and pre-tokenise again with another --val-fraction (or more documents)"
            )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan": plan,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": progress["tokenizer_sha256"],
            "vocab_size": vocab_size,
            "eos_id": eos,
        },
        "dtype": dtype.name,
        "splits": splits,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    (folder / PROGRESS).unlink()
    return manifest


def resume_progress(folder: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The progress of an earlier run with this plan, trimmed to its intact checkpoints (None: start afresh); leftover
    temporary files and shards written after the last checkpoint are removed."""
    for tmp in [*folder.glob(".*.tmp-*"), *folder.glob(".*.tmp")]:  # shards / progress.json of a killed run
        tmp.unlink()
    path = folder / PROGRESS
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except ValueError as e:  # written atomically, so only a hand edit gets here
        raise PretokenizedDataError(f"{path} is not valid JSON ({e}); remove {folder} and start again") from None
    check_same_plan(folder, progress.get("plan"), plan)
    tokenizer = folder / TOKENIZER
    if not tokenizer.is_file() or sha256_file(tokenizer) != progress["tokenizer_sha256"]:
        raise PretokenizedDataError(
            f"{tokenizer} is missing or changed since the run began; remove {folder} and start again"
        )
    intact = []
    for checkpoint in progress["checkpoints"]:
        if not all(_intact(folder / s["name"], s["bytes"]) for s in checkpoint["shards"].values()):
            log.warning("%s: shards of checkpoint %d are missing or truncated; redoing from there", folder, len(intact))
            break
        intact.append(checkpoint)
    progress["checkpoints"] = intact
    recorded = {s["name"] for c in intact for s in c["shards"].values()}
    for stray in (p for split in SPLITS for p in folder.glob(f"{split}-*.bin") if p.name not in recorded):
        stray.unlink()  # written after the last checkpoint: it will be written again
    log.info("%s: resuming after %d finished shard checkpoint(s)", folder, len(intact))
    return progress


def _intact(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def check_same_plan(folder: Path, theirs: Any, ours: dict[str, Any]) -> None:
    if theirs != ours:
        differing = sorted(k for k in ours if not isinstance(theirs, dict) or theirs.get(k) != ours[k])
        raise PretokenizedDataError(
            f"{folder} holds a pre-tokenisation with other settings (differing: {', '.join(differing) or 'all'}); "
            "choose another --out, or remove that folder to start again"
        )


@contextmanager
def exclusive(folder: Path):
    """Hold folder/.lock for the whole run, so that two runs never write the same folder."""
    with open(folder / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PretokenizedDataError(f"another pretokenize run is writing {folder}") from None
        yield


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m project.data.pretokenize", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", action="append", help="files, folders or globs of .txt/.jsonl/.parquet (repeatable)")
    source.add_argument("--hf", help="Hugging Face dataset name or local dataset folder, read with streaming=True")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--hf-split", default="train")
    parser.add_argument(
        "--text-field", default="text", help="the field/column that holds the text (.jsonl/.parquet/--hf)"
    )
    parser.add_argument("--encoding-errors", default="strict", choices=ENCODING_ERRORS)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.json, or bpe:VOCAB to train a byte-level BPE")
    parser.add_argument(
        "--tokenizer-documents", type=int, default=100_000, help="training documents a bpe:V learns from"
    )
    parser.add_argument("--min-frequency", type=int, default=2, help="bpe:V: the minimum frequency of a merge")
    parser.add_argument("--out", required=True, help="the folder to write (a rerun of the same command resumes it)")
    parser.add_argument("--shard-tokens", type=lambda s: int(float(s)), default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (shards end at a document end), e.g. 1e8")  # fmt: skip
    parser.add_argument("--val-fraction", type=float, default=0.01, help="share of documents (by text hash) for val")
    parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count(), help="encoding processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.hf is not None:
            inputs: Inputs = HFInputs(args.hf, args.hf_config, args.hf_split, args.text_field)
        else:
            inputs = FileInputs(args.input, args.text_field, args.encoding_errors)
        pretokenize(inputs, args.tokenizer, args.out, args.shard_tokens, args.workers, args.val_fraction,
                    args.tokenizer_documents, args.min_frequency)  # fmt: skip
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
