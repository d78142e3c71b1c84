"""Text generation: batched prompts decoded with a KV cache (greedy or sampled), stop strings and EOS,
optionally with the token tables served from host memory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from project.config import ConfigError
from project.kv_cache import KVCache
from project.model import ServedRows, Transformer

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or the CPU (with a warning) when its backend is unavailable; None = best available."""
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: running on the CPU", device)
        return torch.device("cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        log.warning("device %s requested but MPS is not available: running on the CPU", device)
        return torch.device("cpu")
    return dev


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen: greedy when `temperature` is 0, else sampled from the softmax at
    `temperature`, restricted to the `top_k` most likely tokens and/or the smallest set whose
    probability reaches `top_p`; `seed` fixes the draws."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1 or null, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] or null, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def next_tokens(logits_BV: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from the last position's logits [B, V]."""
    if settings.greedy:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / settings.temperature
    if settings.top_k is not None and settings.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(settings.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(-1)) >= settings.top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


class HostTables:
    """Keeps every token-indexed table of a model in host memory, the backbone on its device.

    Ids are known before any layer runs, so each step gathers the rows all layers need at once
    (de-duplicated ids, one gather per layer's table) before the step starts. On CUDA they are gathered
    straight into pinned buffers and copied on a side stream, which the step's first kernel waits for;
    on the CPU the same path runs without the copy."""

    def __init__(self, model: Transformer, device: torch.device | str | None = None):
        """Take the tables out of `model` (best loaded on the CPU), then move the rest of it to `device`."""
        self.device = torch.device(device) if device is not None else model.lm_head.weight.device
        self.tables: list[torch.Tensor] = []
        for block in model.layers:
            if block.jtok is None and block.jtok_m is None:
                raise ConfigError(f"variant {model.cfg.variant!r} has no token-indexed tables to keep in host memory")
            table = block.jtok.table if block.jtok is not None else block.jtok_m.tables
            self.tables.append(table.offload())
        model.to(self.device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def gather(self, ids_BT: torch.Tensor) -> ServedRows:
        """The rows of this step's unique ids for every layer, on the model's device."""
        unique_U, inverse = torch.unique(ids_BT.cpu(), return_inverse=True)
        if self.stream is None:
            rows = [table.index_select(-2, unique_U) for table in self.tables]
            return ServedRows(inverse.to(self.device), [r.to(self.device) for r in rows])
        pinned = []
        for table in self.tables:  # gathered straight into pinned buffers: one host copy, async transfers
            shape = (*table.shape[:-2], len(unique_U), table.shape[-1])
            pinned.append(torch.index_select(table, -2, unique_U, out=torch.empty(shape, dtype=table.dtype,
                                                                                  pin_memory=True)))
        with torch.cuda.stream(self.stream):
            moved = [r.to(self.device, non_blocking=True) for r in pinned]
            ids = inverse.pin_memory().to(self.device, non_blocking=True)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for t in (ids, *moved):  # allocated on the side stream, used on the main one
            t.record_stream(main)
        return ServedRows(ids, moved)


def check_fits(model: Transformer, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
    """A clear error when a prompt is empty or a prompt plus its new tokens exceeds the model's context."""
    limit = model.cfg.max_seq_len
    for i, n in enumerate(prompt_lengths):
        if n == 0:
            raise ConfigError(f"prompt {i} is empty: give at least one token")
        if n + max_new_tokens > limit:
            raise ConfigError(
                f"prompt {i} has {n} tokens; with max_new_tokens={max_new_tokens} that is {n + max_new_tokens}, "
                f"more than the model's context (max_seq_len={limit}): shorten the prompt or max_new_tokens"
            )


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    eos_id: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    on_tokens: Callable[[torch.Tensor, list[bool]], None] | None = None,
    host_tables: HostTables | None = None,
) -> list[list[int]]:
    """New tokens for each prompt, at most `settings.max_new_tokens`, ending at `eos_id` (kept) or when
    `stop(row, new_tokens)` says so. `on_tokens(tokens_B, active)` sees every step (streaming).

    With `settings.use_cache` the prompts are left-padded into one batch and prefilled once, then each
    step runs the new token only; without it every step re-runs each whole sequence (the slow path,
    kept as the reference)."""
    model.eval()
    check_fits(model, [len(p) for p in prompts], settings.max_new_tokens)
    if not prompts:
        return []
    device = model.lm_head.weight.device
    generator = None  # without a seed, sampling draws from torch's global generator
    if not settings.greedy and settings.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed)
    if settings.use_cache:
        step = _cached_steps(model, prompts, settings.max_new_tokens, device, host_tables)
    else:
        step = _full_steps(model, prompts, device)
    new: list[list[int]] = [[] for _ in prompts]
    active = [settings.max_new_tokens > 0] * len(prompts)
    logits_BV = next(step) if any(active) else None
    for done_steps in range(1, settings.max_new_tokens + 1):
        tokens_B = next_tokens(logits_BV, settings, generator)
        for row, token in enumerate(tokens_B.tolist()):
            if active[row]:
                new[row].append(token)
        if on_tokens is not None:
            on_tokens(tokens_B, list(active))
        for row in range(len(prompts)):
            if active[row] and (new[row][-1] == eos_id or (stop is not None and stop(row, new[row]))):
                active[row] = False
        if not any(active) or done_steps == settings.max_new_tokens:
            break
        logits_BV = step.send(tokens_B)
    step.close()
    return new


def _cached_steps(model: Transformer, prompts, max_new_tokens: int, device, host_tables: HostTables | None):
    """Generator: yields the next-token logits [B, V]; receives the tokens chosen [B]."""
    width = max(len(p) for p in prompts)
    ids_BT = torch.zeros(len(prompts), width, dtype=torch.long)
    valid_BT = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids_BT[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid_BT[row, width - len(prompt) :] = True
    cache = KVCache(model.cfg, len(prompts), width + max_new_tokens, device, model.lm_head.weight.dtype)
    ids_BT, valid_BT = ids_BT.to(device), valid_BT.to(device)
    while True:
        served = host_tables.gather(ids_BT) if host_tables is not None else None
        logits = model(ids_BT, cache=cache, valid_BT=valid_BT, served=served, last_only=True).logits
        tokens_B = yield logits[:, -1]
        ids_BT, valid_BT = tokens_B[:, None].to(device), None


def _full_steps(model: Transformer, prompts, device):
    """Generator like `_cached_steps`, re-running every whole sequence (right-padded) at each step."""
    sequences = [list(p) for p in prompts]
    while True:
        width = max(len(s) for s in sequences)
        ids_BT = torch.zeros(len(sequences), width, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids_BT[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        logits_BTV = model(ids_BT.to(device)).logits
        last = torch.as_tensor([len(s) - 1 for s in sequences], device=device)
        tokens_B = yield logits_BTV[torch.arange(len(sequences), device=device), last]
        for seq, token in zip(sequences, tokens_B.tolist(), strict=True):
            seq.append(token)


class TextStream:
    """Follows each row's decoded text as tokens arrive; `on_text(row, new_text)` gets what each step adds.

    Byte-level BPE tokens can end inside a UTF-8 character: text ending in the replacement character is
    held back until the next token completes it."""

    def __init__(self, tokenizer, rows: int, on_text: Callable[[int, str], None] | None = None,
                 eos_id: int | None = None):  # fmt: skip
        self.tokenizer, self.on_text, self.eos_id = tokenizer, on_text, eos_id
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.text = [""] * rows
        self.shown = [0] * rows

    def __call__(self, tokens_B: torch.Tensor, active: list[bool]) -> None:
        for row, token in enumerate(tokens_B.tolist()):
            if not active[row] or token == self.eos_id:
                continue
            self.tokens[row].append(token)
            self.text[row] = self.tokenizer.decode(self.tokens[row], skip_special_tokens=False)
            if self.on_text is not None and not self.text[row].endswith("\ufffd"):
                self.on_text(row, self.text[row][self.shown[row] :])
                self.shown[row] = len(self.text[row])


    def finish(self) -> None:
        """Show what is still held back (a character left incomplete at the end)."""
        for row, text in enumerate(self.text):
            if self.on_text is not None and len(text) > self.shown[row]:
                self.on_text(row, text[self.shown[row] :])
                self.shown[row] = len(text)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def generate_text(
    model: Transformer,
    tokenizer,
    prompts: Sequence[str],
    settings: SamplingSettings,
    eos_id: int | None,
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
    host_tables: HostTables | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> list[str]:
    """Continuations of text prompts (a `tokenizers.Tokenizer`), each cut at its first stop string; EOS ends
    a row and is not part of its text. `on_text(row, new_text)` streams what each step adds. `prompt_ids`,
    when given, are the prompts already encoded (e.g. truncated to fit the context)."""
    encoded = prompt_ids if prompt_ids is not None else [tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
    stream = TextStream(tokenizer, len(prompts), on_text, eos_id)
    stop = [term for term in stop if term]

    def reached_stop(row: int, _new: list[int]) -> bool:
        return any(term in stream.text[row] for term in stop)

    generate(model, encoded, settings, eos_id, reached_stop if stop else None, stream, host_tables)
    stream.finish()
    return [cut_at_stop(text, stop) for text in stream.text]
