"""The lm-eval model adapter: a jtok checkpoint (model + its tokenizer) as lm-eval model `jtok`.

Scoring follows lm-eval's own `TemplateLM`: trailing context spaces move into the continuation, the
continuation tokens are what the whole string adds to the context's encoding, and inputs longer than the
model's context (`max_seq_len`) are truncated from the left. Sequences in a batch are right-padded; the
model is causal and routes every token on its own, so padding never changes the scored positions.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-in models first; registering ours alone would hide them)
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from tqdm.auto import tqdm

from project.checkpoint import LoadedModel, load_model
from project.data.tokenizer import EOS
from project.generate import SamplingSettings, generate_text, resolve_device

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
CPU_AUTO_BATCH_SIZE = 32  # "auto" on CPU: there is no out-of-memory signal to probe with


def parse_batch_size(value: int | str | None) -> int | str:
    """lm-eval passes ints or strings ("8", "auto", "auto:4"); return a positive int or "auto"."""
    if value is None or value == "":
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        return "auto"
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {value!r}")
    return size


@register_model("jtok")
class JTokLM(TemplateLM):
    """lm-eval model over a jtok checkpoint: `--model jtok --model_args checkpoint=PATH[,batch_size=..]`."""

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        pretrained: str | os.PathLike | None = None,
        device: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | str | None = 512,
        max_gen_toks: int | str = 256,
        tokenizer: str | None = None,
        loaded: LoadedModel | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        unused = {k: v for k, v in unused.items() if v is not None}
        if unused:
            log.warning("jtok model: ignoring unsupported arguments %s", sorted(unused))
        path = checkpoint or pretrained
        self._device = resolve_device(device)
        if loaded is None:
            if path is None:
                raise ValueError("the jtok model needs a checkpoint: --model_args checkpoint=PATH/TO/last.ckpt")
            loaded = load_model(path, self._device, tokenizer_path=tokenizer)
        else:
            loaded.model.to(self._device).eval()
        self.checkpoint_path = str(path) if path is not None else None
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        eot = self.tokenizer.token_to_id(EOS)
        if eot is None:
            raise ValueError(f"the checkpoint's tokenizer has no {EOS!r} token")
        self._eot_id = eot
        self.max_gen_toks = int(max_gen_toks)
        self.max_batch_size = int(max_batch_size or 512)
        parsed = parse_batch_size(batch_size)
        self.batch_size = self._auto_batch_size() if parsed == "auto" else parsed

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, device: str | None = None, batch_size: int | str | None = None,
                    checkpoint: str | None = None) -> JTokLM:  # fmt: skip
        """Wrap an already loaded model (no second read of the checkpoint)."""
        return cls(checkpoint=checkpoint, device=device, batch_size=batch_size, loaded=loaded)

    # ------------------------------------------------------------------ TemplateLM interface

    @property
    def eot_token_id(self) -> int:
        return self._eot_id

    @property
    def max_length(self) -> int:
        return self.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"jtok-{self.config.variant}-{self.tokenizer.get_vocab_size()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by lm-eval in `results["config"]`."""
        return {
            "checkpoint": self.checkpoint_path,
            "variant": self.config.variant,
            "max_seq_len": self.max_length,
            "model_device": str(self._device),
            "model_batch_size": self.batch_size,
        }

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def _logprobs(self, inputs: list[list[int]], keep: list[int]) -> list[torch.Tensor]:
        """Right-pad the inputs into one batch; return float32 log-probs [keep_i, V] of each input's last positions."""
        width = max(len(ids) for ids in inputs)
        batch = torch.full((len(inputs), width), self._eot_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = self.model(batch.to(self._device)).logits
        return [
            F.log_softmax(logits[row, len(ids) - n : len(ids)].float(), dim=-1).cpu()
            for row, (ids, n) in enumerate(zip(inputs, keep, strict=True))
        ]

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model input scoring `continuation`: the last max_length tokens before its final token."""
        if not continuation:
            raise ValueError("cannot score an empty continuation")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"continuation of {len(continuation)} tokens is longer than the model's context ({self.max_length})"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """Sum of continuation log-probs and whether greedy decoding yields it, batched longest first.

        Requests that share `context + continuation[:-1]` (e.g. one-token answers " A".." D") share one forward.
        """
        collator = Collator(
            requests,
            sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])),
            group_by="contexts",
            group_fn=lambda req: req[1] + req[2][:-1],
        )
        results: list[tuple[float, bool]] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="jtok loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            logprobs = self._logprobs([self._window(ctx, cont) for _, ctx, cont in chunk], [len(c) for *_, c in chunk])
            for (request, ctx, cont), lp in zip(chunk, logprobs, strict=True):
                for hit_request, hit_cont, hit_lp in collator.get_cache(
                    req_str=request, cxt_toks=ctx, cont_toks=cont, logits=lp.unsqueeze(0)
                ):
                    cont_lp = hit_lp[0, -len(hit_cont) :]
                    target = torch.tensor(hit_cont, dtype=torch.long)
                    answer = (
                        float(cont_lp.gather(-1, target[:, None]).sum()),
                        bool((cont_lp.argmax(-1) == target).all()),
                    )
                    results.append(answer)
                    if hit_request is not None:
                        self.cache_hook.add_partial("loglikelihood", hit_request, answer)
                    pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings (after an EOS prefix) in disjoint windows of max_length tokens."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, prediction in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, context, prediction))
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores, strict=True):
            totals[index] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations decoded with the KV cache (greedy, or sampled when `do_sample` with `temperature`,
        `top_k`, `top_p`, `seed`), stopped at the first `until` string, EOS or `max_gen_toks` new tokens."""
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        results: list[str] = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="jtok generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            settings = normalize_gen_kwargs(chunk[0][1], default_max_gen_toks=self.max_gen_toks)
            until = handle_stop_sequences(settings.get("until"), eos=EOS)
            contexts = [self.tok_encode(context) or [self.prefix_token_id] for context, _ in chunk]
            sampling = self._sampling(settings, max(len(ids) for ids in contexts))
            texts = generate_text(
                self.model, self.tokenizer, [context for context, _ in chunk], sampling, self._eot_id, until,
                prompt_ids=[ids[-(self.max_length - sampling.max_new_tokens) :] for ids in contexts],
            )
            for (context, gen_kwargs), text in zip(chunk, texts, strict=True):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def _sampling(self, settings: dict[str, Any], longest_context: int) -> SamplingSettings:
        """lm-eval's normalised generation kwargs as our settings (temperature 0 when not sampling).

        Contexts and new tokens share the model's window (the cache does not slide). When `max_gen_toks`
        would leave the longest context less than half of it, fewer tokens are generated instead of cutting
        the context to nothing (a 128-token model asked for lm-eval's default 256)."""
        wanted = int(settings["max_gen_toks"])
        max_new = min(wanted, max(self.max_length - longest_context, self.max_length // 2))
        if max_new < wanted:
            log.warning("jtok model: generating at most %d tokens (max_gen_toks=%d) so that the context keeps %d of "
                        "the model's %d positions", max_new, wanted, self.max_length - max_new, self.max_length)  # fmt: skip
        if not settings.get("do_sample"):
            return SamplingSettings(max_new_tokens=max_new)
        ignored = sorted(set(settings) - {"do_sample", "until", "max_gen_toks", "temperature", "top_k", "top_p", "seed"})
        if ignored:
            log.warning("jtok model: ignoring generation settings %s", ignored)
        return SamplingSettings(
            max_new_tokens=max_new,
            temperature=float(settings.get("temperature", 1.0)),  # 0 = greedy
            top_k=settings.get("top_k"),
            top_p=settings.get("top_p"),
            seed=settings.get("seed"),
        )

    # ------------------------------------------------------------------ batch size

    def _auto_batch_size(self) -> int:
        """Largest power-of-two batch of full-length inputs that fits on the GPU (a fixed size on CPU)."""
        if self._device.type != "cuda":
            return min(CPU_AUTO_BATCH_SIZE, self.max_batch_size)
        size = self.max_batch_size
        while size > 1:
            try:
                self._logprobs([[self._eot_id] * self.max_length] * size, [self.max_length] * size)
                return size
            except torch.cuda.OutOfMemoryError:
                size //= 2
            finally:
                torch.cuda.empty_cache()
        return 1
