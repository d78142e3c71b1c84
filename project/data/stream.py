"""`data=hf_stream`: a Hugging Face dataset read with `streaming=True` during training, tokenised on the fly and
packed into windows as the data cache packs them, sharded over ranks and dataloader workers, resumable at the next
unread window.

Each rank takes its part of the dataset with `datasets.distributed.split_dataset_by_node`; within a rank, stream j
of N (one per dataloader worker) reads the shards j, j+N, ... of it (`IterableDataset.shard(contiguous=False)`).
The streams partition the documents. Each stream packs its own documents and yields whole batches, which the
DataLoader takes from its workers in turn, so batch k of a rank is batch k // N of stream k % N. Every batch carries
where its stream stands after it (the dataset's `state_dict()` before the chunk of documents holding the next
window's first token, and the token offset in that chunk); the datamodule records it when the batch is trained on
and saves it in the checkpoint, so a resumed run re-reads one chunk and continues with the window an uninterrupted
run would read next. Validation is a fixed set of windows: the first `max_val_batches` batches packed from the
documents whose text hash falls in `val_fraction` (as the pre-tokeniser splits), which training never reads."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import count, islice
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from project.config import ConfigError, UserError
from project.data.hf import load_hf_dataset
from project.data.inputs import split_of
from project.data.module import TokenDataModule
from project.data.shards import encode_pieces, piece_batches
from project.data.source import check_fraction
from project.data.tokenizer import TOKENIZER_KEYS, eos_id, load_tokenizer, vocab_size_of

log = logging.getLogger(__name__)

DOCS_PER_READ = 64  # records read (and tokenised) at a time; a resume re-reads at most one such chunk
SOURCE_KEYS = {"name", "config", "split", "text_field", "val_fraction"}


class StreamEndedError(UserError, RuntimeError):
    """A training stream ran out of documents before `trainer.max_steps` (no document is read twice)."""


@dataclass
class Chunk:
    """The ids of one read of DOCS_PER_READ records (the chosen split's documents, each followed by EOS)."""

    state: dict[str, Any] | None  # the dataset's state_dict() before this read; None: the stream's beginning
    ids: np.ndarray
    starts: np.ndarray  # where each document starts in `ids`
    documents_before: int  # documents of the stream in the chunks before this one


def token_chunks(dataset: Any, tokenizer: Tokenizer, text_field: str, val_fraction: float, split: str,
                 start: Mapping[str, Any] | None = None) -> Iterator[Chunk]:  # fmt: skip
    """The stream's chunks from `start` (a position from `pack`; the dataset must have loaded its state) on."""
    eos = eos_id(tokenizer)
    state = None if start is None else start["state"]
    documents = 0 if start is None else start["documents"]
    for records in dataset.iter(batch_size=DOCS_PER_READ):
        after = dataset.state_dict()
        if text_field not in records:
            raise ConfigError(f"dataset {dataset.info.dataset_name or ''}: no field {text_field!r} (fields: "
                              f"{sorted(records)}); set data.source.text_field")  # fmt: skip
        # A null or empty text is no document, as in the cache; the other split's documents are never encoded.
        texts = [text for text in records[text_field] if text and split_of(text, val_fraction) == split]
        parts: list[np.ndarray] = []
        starts: list[int] = []
        length = 0
        for items, pieces in piece_batches(((None, text) for text in texts), val_fraction):
            ids = encode_pieces(tokenizer, pieces, [first for _, first, _, _ in items], np.dtype(np.int64))
            for (_, first, last, _), piece_ids in zip(items, ids):
                if first:
                    starts.append(length)
                parts += [piece_ids, np.array([eos])] if last else [piece_ids]
                length += len(piece_ids) + last
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        yield Chunk(state, ids, np.asarray(starts, dtype=np.int64), documents)
        state, documents = after, documents + len(starts)


def pack(chunks: Iterator[Chunk], seq_len: int, offset: int = 0) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Windows of seq_len + 1 tokens over the chunks' concatenation, from token `offset` of the first chunk on
    (consecutive windows share one token, as the cache's windows do), each with the position of the next window:
    `state` and `documents` of the chunk it starts in, its `offset` there, and `documents_read` (documents with a
    token in this or an earlier window)."""
    pending: deque[Chunk] = deque()
    available = -offset  # tokens in `pending` from `offset` on
    for chunk in chunks:
        pending.append(chunk)
        available += len(chunk.ids)
        while available >= seq_len + 1:
            window, cursor, need = [], offset, seq_len + 1
            for part in pending:
                window.append(part.ids[cursor : cursor + need])
                need -= len(window[-1])
                cursor = 0
                if need == 0:
                    break
            offset += seq_len
            available -= seq_len
            while offset >= len(pending[0].ids):  # chunks the next window no longer touches
                offset -= len(pending[0].ids)
                pending.popleft()
            front = pending[0]
            position = {"state": front.state, "documents": front.documents_before, "offset": offset,
                        "documents_read": front.documents_before + int(np.searchsorted(front.starts, offset, "right"))}
            yield np.concatenate(window), position


def stream_documents(dataset: Any, streams: int, stream: int) -> Any:
    """Stream `stream` of `streams`: the shards stream, stream + streams, ... of the rank's dataset (a new object,
    so that loading a state into it leaves the rank's dataset untouched)."""
    return dataset.shard(num_shards=streams, index=stream, contiguous=False)


class StreamBatches(IterableDataset):
    """One rank's training batches `(inputs, targets, {"stream", "position"})`. Worker w reads stream
    (w + phase) % streams, so a resumed DataLoader, which starts again at worker 0, continues the round robin of
    streams where the interrupted one stopped. With `remaining` (the rank's batches still to train on), the
    workers stop after them: Lightning fetches one batch beyond the last step, which a dataset holding just
    enough tokens does not have."""

    def __init__(self, dataset: Any, tokenizer_json: str, text_field: str, val_fraction: float, seq_len: int,
                 batch_size: int, streams: int, starts: Mapping[int, Mapping[str, Any]], phase: int,
                 remaining: int | None = None) -> None:  # fmt: skip
        self.dataset, self.tokenizer_json, self.text_field = dataset, tokenizer_json, text_field
        self.val_fraction, self.seq_len, self.batch_size = val_fraction, seq_len, batch_size
        self.streams, self.starts, self.phase, self.remaining = streams, dict(starts), phase, remaining

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        info = get_worker_info()
        workers = 1 if info is None else info.num_workers
        if workers != self.streams:
            raise RuntimeError(f"{workers} dataloader workers for {self.streams} streams: a bug")
        worker = 0 if info is None else info.id
        stream = (worker + self.phase) % self.streams
        dataset = stream_documents(self.dataset, self.streams, stream)
        start = self.starts.get(stream)
        if start is not None and start["state"] is not None:
            dataset.load_state_dict(start["state"])
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        chunks = token_chunks(dataset, tokenizer, self.text_field, self.val_fraction, "train", start)
        windows = pack(chunks, self.seq_len, 0 if start is None else start["offset"])
        # The DataLoader hands out batch i of the rank from worker i % streams.
        turns = count() if self.remaining is None else range(worker, self.remaining, self.streams)
        for _ in turns:
            batch = list(islice(windows, self.batch_size))
            if len(batch) < self.batch_size:
                read = batch[-1][1]["documents_read"] if batch else (start or {}).get("documents_read", 0)
                raise StreamEndedError(
                    f"training stream {stream} of {self.streams} (dataloader workers) ended after ~{read} documents: "
                    "the dataset holds fewer tokens than trainer.max_steps reads, and streaming never reads a "
                    "document twice. Lower trainer.max_steps (the last checkpoint is kept), or use a larger dataset"
                )
            tokens = torch.from_numpy(np.stack([window for window, _ in batch]))
            yield tokens[:, :-1], tokens[:, 1:], {"stream": stream, "position": batch[-1][1]}


class StreamingDataModule(TokenDataModule):
    """`data=hf_stream`: training batches streamed from a Hugging Face dataset (see the module docstring), with the
    run's tokenizer (`tokenizer.path`, required); validation is a fixed set of windows, sharded over ranks as the
    cache's. Needs `trainer.max_steps`: a stream has no known length."""

    streaming = True

    def __init__(
        self,
        source: Mapping[str, Any],
        tokenizer: Mapping[str, Any] | None = None,
        seq_len: int = 1024,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        max_val_batches: int | None = 50,
    ) -> None:
        source = dict(source or {})
        unknown = set(source) - SOURCE_KEYS
        if unknown or not source.get("name"):
            raise ConfigError(f"data.source for data=hf_stream takes {sorted(SOURCE_KEYS)} (name required), "
                              f"got {sorted(source)}")  # fmt: skip
        tokenizer = dict(tokenizer or {})
        if set(tokenizer) - TOKENIZER_KEYS:
            raise ConfigError(f"unknown data.tokenizer settings {sorted(set(tokenizer) - TOKENIZER_KEYS)}")
        if not tokenizer.get("path"):
            raise ConfigError(
                "data=hf_stream needs data.tokenizer.path (a tokenizer.json with <|endoftext|>): a stream is "
                "tokenised as it is read, so the tokenizer exists first. Train one on a sample, e.g. python -m "
                "project.data.pretokenize --hf NAME --tokenizer bpe:32000 --out DIR (DIR/tokenizer.json)"
            )
        if max_val_batches is None:
            raise ConfigError("data=hf_stream needs data.max_val_batches: validation reads that many batches of "
                              "the stream's held-out documents")  # fmt: skip
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.name, self.config = source["name"], source.get("config")
        self.split, self.text_field = source.get("split", "train"), source.get("text_field", "text")
        self.val_fraction = float(source.get("val_fraction", 0.01))
        check_fraction(self.val_fraction)
        self.tokenizer_path = str(tokenizer["path"])
        # vocab_size / min_frequency are the other sources' training settings (experiments set them): not used here
        super().__init__(source=None, tokenizer=None, seq_len=seq_len, batch_size=batch_size,  # type: ignore[arg-type]
                         val_batch_size=val_batch_size, num_workers=num_workers, max_val_batches=max_val_batches)
        self.dataset: Any = None
        self.streams = 1  # training streams per rank, set by prepare_data
        self._batches = 0  # training batches of this rank trained on (restored on resume)
        self._positions: dict[int, dict[str, Any]] = {}  # each stream's position after its last batch trained on
        self._resumed: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        """Load the tokenizer and open the stream (offline and absent, this fails at once, saying what to do)."""
        if self._meta is not None:
            return
        self._tokenizer = load_tokenizer(self.tokenizer_path)
        self.dataset = load_hf_dataset(self.name, self.config, self.split, streaming=True)
        self.streams = self._count_streams()
        self._meta = {
            "kind": "hf_stream",
            "source": {"name": self.name, "config": self.config, "split": self.split, "text_field": self.text_field,
                       "val_fraction": self.val_fraction, "streams": self.streams},  # fmt: skip
            "vocab_size": vocab_size_of(self._tokenizer),
            "eos_id": eos_id(self._tokenizer),
            "train_tokens": None,
            "train_documents": None,
            "qa": None,
        }

    def _count_streams(self) -> int:
        """Training streams per rank: one per dataloader worker (as many as there are shards at most), else one."""
        if self.num_workers == 0:
            return 1
        shards = int(self.dataset.n_shards)
        if shards < self.num_workers:
            log.warning("data.num_workers=%d but the dataset has %d shard(s): using %d workers",
                        self.num_workers, shards, shards)  # fmt: skip
        return min(self.num_workers, shards)

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if self.val_dataset is None:
            self.val_dataset = self._val_windows()

    def _val_windows(self) -> torch.Tensor:
        """The first max_val_batches x val_batch_size windows of the held-out documents, in stream order (the whole
        dataset's, the same on every rank and in every run)."""
        wanted = self.max_val_batches * self.val_batch_size
        dataset = stream_documents(self.dataset, 1, 0)
        chunks = token_chunks(dataset, self.tokenizer, self.text_field, self.val_fraction, "val")
        windows = [window for window, _ in islice(pack(chunks, self.seq_len), wanted)]
        if len(windows) < wanted:
            log.warning("the stream's held-out documents (val_fraction=%g) fill %d validation windows of the %d "
                        "asked for", self.val_fraction, len(windows), wanted)  # fmt: skip
        if not windows:
            raise ConfigError(f"the stream's held-out documents (val_fraction={self.val_fraction}) do not fill one "
                              f"window of seq_len={self.seq_len}: raise data.source.val_fraction")  # fmt: skip
        return torch.from_numpy(np.stack(windows))

    def train_dataloader(self) -> DataLoader:
        """This rank's part of the stream, in batches; continues after the last batch trained on when resuming."""
        if self.dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        from datasets.distributed import split_dataset_by_node

        rank, world = self._rank_and_world()
        streams = self.streams
        if self._resumed is not None:
            layout = {"world_size": world, "streams": streams}
            if self._resumed["layout"] != layout:
                raise ConfigError(
                    f"cannot resume this streamed run: its checkpoint was written with {self._resumed['layout']}, "
                    f"this run has {layout}; resume with the same devices and data.num_workers"
                )
            mine = self._resumed["ranks"][rank]
            self._batches, self._positions = int(mine["batches"]), {int(k): v for k, v in mine["streams"].items()}
            self._resumed = None
        trainer = self.trainer
        remaining = None
        if trainer is not None and trainer.max_steps > 0:
            remaining = trainer.max_steps * trainer.accumulate_grad_batches - self._batches
        batches = StreamBatches(
            split_dataset_by_node(self.dataset, rank=rank, world_size=world), self.tokenizer.to_str(),
            self.text_field, self.val_fraction, self.seq_len, self.batch_size, streams, self._positions,
            phase=self._batches % streams, remaining=remaining,
        )  # fmt: skip
        return DataLoader(batches, batch_size=None, num_workers=0 if self.num_workers == 0 else streams,
                          pin_memory=torch.cuda.is_available())  # fmt: skip

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record where a training batch's stream stands (the batch is about to be trained on); pass on the tensors."""
        if len(batch) == 3:
            inputs, targets, tag = batch
            self._positions[int(tag["stream"])] = tag["position"]
            self._batches += 1
            return inputs, targets
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Every rank's stream positions (gathered: only rank 0 writes the checkpoint)."""
        rank, world = self._rank_and_world()
        mine = {"batches": self._batches, "streams": dict(self._positions)}
        ranks = [mine]
        if world > 1:
            import torch.distributed as dist

            ranks = [None] * world
            dist.all_gather_object(ranks, mine)
        return {"layout": {"world_size": world, "streams": self.streams}, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = state_dict  # applied by train_dataloader, which knows this process's rank

    def data_record(self) -> dict[str, Any]:
        """summary.json's `data` for a stream: what the run read (summed over ranks); no split size is known,
        so no epochs (the stream stops at its end rather than read a document twice)."""
        counts = torch.tensor([self._batches * self.batch_size, sum(p["documents_read"] for p in self._positions.values())])
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        windows, documents = (int(c) for c in counts)
        return {"streaming": True, "train_tokens": None, "train_documents": None, "windows_read": windows,
                "tokens_read": windows * self.seq_len, "documents_read": documents, "usable_windows": None,
                "steps_per_epoch": None, "epochs": None, "qa_path": None}  # fmt: skip

    @property
    def cache_path(self):  # type: ignore[override]
        raise AttributeError("a streamed dataset has no cache folder")

    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            raise RuntimeError("call prepare_data() first")
        return self._meta

    @property
    def tokenizer(self) -> Tokenizer:
        _ = self.meta
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def train_tokens_per_epoch(self) -> int:
        raise AttributeError("a streamed dataset has no known length")
