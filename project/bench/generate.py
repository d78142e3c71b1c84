"""Prefill and decode speed of every variant with the KV cache: `python -m project.bench.generate`.

Each repetition times every variant once, in turn (interleaved, so machine noise hits all alike), through
the real `project.generate.generate` path: greedy, a batch of prompts, a fixed number of new tokens (no
EOS). Prefill tokens/s is prompt tokens over the time to the first new token; decode tokens/s is the
remaining new tokens over their time. Ratios to the baseline are taken within each repetition, then the
median is reported with the min-max spread. Optional rows: the tables kept in host memory
(`--host-tables`), and today's path without a cache (`--rerun`, every step re-runs each sequence).
Device memory (`device_mib`): on CUDA the peak allocated during a generation; on the CPU the model's resident
weights and buffers plus the KV cache (host-memory tables excluded), computed from the tensors.
Writes a CSV and a Markdown table (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

from project.bench import write_table
from project.config import VARIANTS, ModelConfig
from project.generate import HostTables, SamplingSettings, generate
from project.model import Transformer

FIELDS = ["variant", "mode", "prefill_tok_s", "prefill_vs_baseline", "prefill_spread", "decode_tok_s",
          "decode_vs_baseline", "decode_spread", "device_mib", "token_table_mib"]  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions (median reported)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                   help="ModelConfig overrides, e.g. d_model=512 n_layers=8 (default: configs/model/_base.yaml)")
    p.add_argument("--host-tables", action="store_true", help="also time each table variant with host-memory tables")
    p.add_argument("--rerun", action="store_true", help="also time decoding without the cache (slow)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench_results/generate", help="folder for generate.csv and generate.md")
    return p.parse_args(argv)


def base_config(vocab: int, max_seq_len: int, overrides: list[str]) -> dict:
    """The shared architecture of configs/model/_base.yaml, with a vocabulary, a context and overrides."""
    from omegaconf import OmegaConf

    base = OmegaConf.to_container(OmegaConf.load(Path(__file__).parents[2] / "configs/model/_base.yaml"))
    base = {k: v for k, v in base.items() if k != "defaults"}
    base.update(vocab_size=vocab, max_seq_len=max_seq_len)
    for item in overrides:
        key, _, value = item.partition("=")
        base[key] = yaml.safe_load(value) if value else None  # "512" -> 512, "true" -> True, "null" -> None
    return base


def build(variant: str, cfg: dict, device, dtype, host_tables: bool) -> tuple[Transformer, HostTables | None]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict({**cfg, "variant": variant})).to(dtype).eval()
    if host_tables:
        return model, HostTables(model, device)
    return model.to(device), None


def device_mib(model: Transformer, prompts: int, length: int) -> float:
    """Resident weights and buffers on the model's device plus a KV cache for `prompts` x `length`."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    c = model.cfg
    cache = 2 * c.n_layers * prompts * c.kv_heads * length * c.head_dim * model.lm_head.weight.element_size()
    return (weights + cache) / 2**20


def time_one(model, host, prompts, new_tokens: int, use_cache: bool, device) -> tuple[float, float, float | None]:
    """(prefill tokens/s, decode tokens/s, peak MiB allocated on CUDA or None) of one greedy generation."""
    stamps: list[float] = []

    def stamp(_tokens, _active) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    generate(model, prompts, SamplingSettings(max_new_tokens=new_tokens, use_cache=use_cache), on_tokens=stamp,
             host_tables=host)  # fmt: skip
    prompt_tokens = sum(len(p) for p in prompts)
    decoded = len(prompts) * (len(stamps) - 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return prompt_tokens / (stamps[0] - start), decoded / (stamps[-1] - stamps[0]), peak


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    variants = a.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "baseline" not in variants:
        raise SystemExit(f"--variants must include baseline and be among {', '.join(VARIANTS)}; got {a.variants}")
    cfg = base_config(a.vocab, a.prompt_len + a.new_tokens, a.model)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, a.vocab, (a.batch, a.prompt_len), generator=gen).tolist()
    modes = [(v, "cached") for v in variants]
    if a.host_tables:
        modes += [(v, "host_tables") for v in variants if "jtok" in v]
    if a.rerun:
        modes += [(v, "rerun") for v in variants]
    models = {m: build(m[0], cfg, device, dtype, m[1] == "host_tables") for m in modes}
    for (model, host), (_, mode) in zip(models.values(), modes):  # warm-up
        time_one(model, host, prompts, 4, mode != "rerun", device)
    samples: dict[tuple[str, str], list[tuple[float, float, float | None]]] = {m: [] for m in modes}
    for rep in range(a.repeats):
        for m in modes:
            model, host = models[m]
            samples[m].append(time_one(model, host, prompts, a.new_tokens, m[1] != "rerun", device))
        print(f"repeat {rep + 1}/{a.repeats} done", flush=True)
    rows = []
    for (variant, mode), runs in samples.items():
        base = samples[("baseline", "cached")]
        ratios = [[r[i] / b[i] for r, b in zip(runs, base, strict=True)] for i in (0, 1)]
        model, host = models[(variant, mode)]
        tables = sum(t.numel() * t.element_size() for t in host.tables) if host else sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if ".table" in n)  # fmt: skip
        rows.append({
            "variant": variant, "mode": mode,
            "prefill_tok_s": round(statistics.median(r[0] for r in runs)),
            "prefill_vs_baseline": round(statistics.median(ratios[0]), 3),
            "prefill_spread": f"{min(ratios[0]):.3f}-{max(ratios[0]):.3f}",
            "decode_tok_s": round(statistics.median(r[1] for r in runs)),
            "decode_vs_baseline": round(statistics.median(ratios[1]), 3),
            "decode_spread": f"{min(ratios[1]):.3f}-{max(ratios[1]):.3f}",
            "device_mib": round(runs[0][2] if device.type == "cuda" else device_mib(model, a.batch, a.prompt_len + a.new_tokens), 1),
            "token_table_mib": round(tables / 2**20, 1),
        })  # fmt: skip
    out = Path(a.out)
    header = (f"{device.type}, {dtype}, batch {a.batch}, prompt {a.prompt_len}, {a.new_tokens} new tokens, "
              f"V={a.vocab}, model overrides: {' '.join(a.model) or 'none'}, {a.repeats} interleaved repeats, "
              f"torch threads {torch.get_num_threads()}")  # fmt: skip
    write_table(rows, FIELDS, out, "generate", header)
    return rows


if __name__ == "__main__":
    main()
