"""Training-step time and memory of every variant and table optimizer: `python -m project.bench.train_step`.

A step is what training does (project/lit_module.py): forward, cross-entropy + aux loss, backward, the
aux-loss-free router-bias step, `project.table_optim.clip_grad_norm_(params, 1.0)`, optimizer step, LR
schedule step, zero_grad(set_to_none=True). The optimizer comes from `project.optim.build_optimizer`; with a
row-sparse table optimizer (`adam`, `rowwise_adam`) the tables' `sparse_grad` is on, as the LightningModule sets it.

Rows: every variant at the default config (ModelConfig's defaults = configs/model/_base.yaml: d 128, 4 layers,
4 heads, MoE 1 shared + 8 routed top-2, n_e 5 top-2; data V 2048, batch 16, seq_len 128) once per table
optimizer (`--table-optimizers`; baseline and moe once), and with `--sweep` (default) jtok_m at n_e in
`--sweep-tables` and baseline / jtok / jtok_m at V in `--sweep-vocabs`, to show which costs grow with V or n_e.

Token ids are drawn (fixed seed) from a Zipf-like law, P(id = k) proportional to 1 / (k + 1)^1.1 over the V ids,
so a batch touches a realistic few hundred rows, as text does, rather than nearly every row of a uniform draw.
Each repetition times every configuration once, in turn (interleaved, so machine noise hits all alike),
`--steps` steps each after `--warmup` untimed ones; the ratio to the baseline at the same V is taken within each
repetition, then the median is reported with its min-max spread. `memory_mib`: on CUDA the peak allocated during
the timed steps, less what the other configurations (all kept resident) hold; on the CPU the bytes of parameters + gradients + optimizer state after a step, computed from
the tensors. `table_state_mib`: the token tables' optimizer state alone (the row-sparse optimizers' target:
rowwise_adam's table state <= 55% of dense AdamW's). Writes <name>.csv and <name>.md (atomically), prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from project.bench import write_table
from project.config import VARIANTS, ModelConfig
from project.model import Transformer
from project.optim import OptimConfig, build_optimizer
from project.table_optim import TABLE_OPTIMIZERS, clip_grad_norm_

FIELDS = ["variant", "V", "n_e", "table_optimizer", "step_ms", "vs_baseline", "spread", "table_state_mib", "memory_mib"]
NONE = "-"  # the n_e / table optimizer of a configuration without that setting
ZIPF_EXPONENT = 1.1
QUICK_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2}


@dataclass(frozen=True)
class Case:
    """One configuration timed: a variant at a vocabulary size, number of tables and table optimizer."""

    variant: str
    vocab: int
    n_e: int | str = NONE
    table_optimizer: str = NONE

    @property
    def baseline(self) -> Case:
        return Case("baseline", self.vocab)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--table-optimizers", default=",".join(TABLE_OPTIMIZERS), help="for the variants with tables")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="also the n_e and V sweeps (--no-sweep: the default config only)")  # fmt: skip
    p.add_argument("--sweep-tables", default="5,10,20", help="n_e of the jtok_m sweep (at the default V)")
    p.add_argument("--sweep-vocabs", default=None, help="V of the baseline/jtok/jtok_m sweep (default 2048,8192,32768)")
    p.add_argument("--vocab", type=int, default=None, help="the default config's V (default 2048; 256 with --quick)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; 2 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128; 16 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repetitions (default 7; 2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration and repetition (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration first (default 3)")
    p.add_argument("--quick", action="store_true", help=f"a tiny run for tests: model {QUICK_MODEL}, small batch and V")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["32-true", "bf16-mixed"],
                   help="as the trainer's: default bf16-mixed on CUDA, 32-true on the CPU")  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="docs/results/train_step_bench", help="folder for <name>.csv and <name>.md")
    p.add_argument("--name", default="default", help="file name stem of the results")
    a = p.parse_args(argv)
    quick = a.quick
    defaults = {"vocab": 256 if quick else 2048, "batch": 2 if quick else 16, "seq_len": 16 if quick else 128,
                "repeats": 2 if quick else 7, "steps": 2 if quick else 5, "warmup": 1 if quick else 3,
                "sweep_vocabs": "256,512,1024" if quick else "2048,8192,32768"}  # fmt: skip
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def cases_of(a: argparse.Namespace) -> list[Case]:
    """The configurations timed, in table order: the default config, then the n_e and V sweeps (no duplicates)."""
    variants, optimizers = a.variants.split(","), a.table_optimizers.split(",")
    bad = sorted(set(variants) - set(VARIANTS)) + sorted(set(optimizers) - set(TABLE_OPTIMIZERS))
    if bad or "baseline" not in variants:
        raise SystemExit(f"--variants must include baseline and be among {', '.join(VARIANTS)}, --table-optimizers "
                         f"among {', '.join(TABLE_OPTIMIZERS)}; unknown: {', '.join(bad) or 'none'}")  # fmt: skip
    n_e = ModelConfig().jtokm_tables

    def with_tables(variant: str, vocab: int, tables: int) -> list[Case]:
        modulator = VARIANTS[variant][1]
        if modulator == "none":
            return [Case(variant, vocab)]
        return [Case(variant, vocab, tables if modulator == "jtok_m" else NONE, o) for o in optimizers]

    cases = [c for v in variants for c in with_tables(v, a.vocab, n_e)]
    if a.sweep:
        cases += [c for t in map(int, a.sweep_tables.split(",")) for c in with_tables("jtok_m", a.vocab, t)]
        for vocab in map(int, a.sweep_vocabs.split(",")):
            cases += [c for v in ("baseline", "jtok", "jtok_m") for c in with_tables(v, vocab, n_e)]
    return list(dict.fromkeys(cases))


def model_config(case: Case, seq_len: int, quick: bool) -> ModelConfig:
    """ModelConfig's defaults (configs/model/_base.yaml) at the case's V and n_e; tiny with --quick."""
    values = dict(variant=case.variant, vocab_size=case.vocab, max_seq_len=seq_len, **(QUICK_MODEL if quick else {}))
    if case.n_e != NONE:
        values["jtokm_tables"] = case.n_e
    return ModelConfig.from_dict(values)


def zipf_batches(vocab: int, batch: int, seq_len: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """`count` (inputs_BT, targets_BT) pairs of ids drawn with P(k) ~ 1/(k+1)^1.1 (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    probs_V = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-ZIPF_EXPONENT)
    batches = []
    for _ in range(count):
        ids = torch.multinomial(probs_V, batch * (seq_len + 1), replacement=True, generator=gen)
        ids_BT = ids.view(batch, seq_len + 1)
        batches.append((ids_BT[:, :-1].contiguous(), ids_BT[:, 1:].contiguous()))
    return batches


class Trainer:
    """A model, its optimizer and schedule, and one training step as project/lit_module.py takes it."""

    def __init__(self, cfg: ModelConfig, table_optimizer: str, device: torch.device, precision: str, max_steps: int):
        torch.manual_seed(0)
        self.model = Transformer(cfg).to(device).train()
        optim_cfg = OptimConfig(table_optimizer=table_optimizer if table_optimizer != NONE else "adamw")
        self.model.use_row_sparse_grads(optim_cfg.row_sparse_tables)
        self.opt, self.sched = build_optimizer(self.model, optim_cfg, max_steps)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.device, self.bf16 = device, precision == "bf16-mixed"

    def step(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor, account: bool = False) -> tuple[int, int] | None:
        """One training step; with `account`, (all bytes, table-state bytes) measured before the gradients go."""
        autocast = torch.autocast(self.device.type, torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            out = self.model(inputs_BT)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets_BT.flatten())
        (ce + out.aux_loss).backward()
        self.model.update_router_biases()
        clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        sizes = state_bytes(self.model, self.opt) if account else None
        self.opt.zero_grad(set_to_none=True)
        return sizes


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a dense tensor, or of a sparse COO tensor's indices and values."""
    if t.is_sparse:
        return tensor_bytes(t._indices()) + tensor_bytes(t._values())
    return t.numel() * t.element_size()


def state_bytes(model: Transformer, opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(parameters + gradients + optimizer state, the token tables' optimizer state) in bytes, from the tensors."""
    tables = {id(t.weight) for t in model.token_tables()}
    params = [p for g in opt.param_groups for p in g["params"]]
    total = sum(tensor_bytes(p) + (tensor_bytes(p.grad) if p.grad is not None else 0) for p in params)
    table_state = 0
    for p in params:
        state = sum(tensor_bytes(v) for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor))
        total += state
        table_state += state if id(p) in tables else 0
    return total, table_state


def time_steps(trainer: Trainer, batches, steps: int) -> tuple[float, float | None]:
    """(mean ms per step over `steps` steps, peak MiB allocated on CUDA or None)."""
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(trainer.device)
        # Every configuration stays resident: count only this one's tensors and what its steps add on top.
        others = torch.cuda.memory_allocated(trainer.device) - state_bytes(trainer.model, trainer.opt)[0]
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(*batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return 1000 * elapsed / steps, (torch.cuda.max_memory_allocated(trainer.device) - others) / 2**20 if cuda else None


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    precision = a.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    cases = cases_of(a)
    started = time.perf_counter()
    batches = {v: [tuple(t.to(device) for t in b) for b in zipf_batches(v, a.batch, a.seq_len, max(a.steps, 1))]
               for v in sorted({c.vocab for c in cases})}  # fmt: skip
    max_steps = a.warmup + 1 + a.repeats * a.steps
    trainers, accounted = {}, {}
    for case in cases:  # build and warm up each in turn; the last warm-up step is the memory accounting one
        cfg = model_config(case, a.seq_len, a.quick)
        trainers[case] = Trainer(cfg, case.table_optimizer, device, precision, max_steps)
        for i in range(a.warmup):
            trainers[case].step(*batches[case.vocab][i % len(batches[case.vocab])])
        accounted[case] = trainers[case].step(*batches[case.vocab][0], account=True)
    print(f"built and warmed up {len(cases)} configurations in {time.perf_counter() - started:.0f}s", flush=True)
    samples: dict[Case, list[tuple[float, float | None]]] = {c: [] for c in cases}
    for rep in range(a.repeats):
        for case in cases:
            samples[case].append(time_steps(trainers[case], batches[case.vocab], a.steps))
        print(f"repeat {rep + 1}/{a.repeats} done ({time.perf_counter() - started:.0f}s)", flush=True)
    rows = [result_row(case, samples, accounted[case], device) for case in cases]
    write_results(rows, a, device, precision)
    print(f"total {time.perf_counter() - started:.0f}s", flush=True)
    return rows


def result_row(case: Case, samples: dict, accounted: tuple[int, int], device: torch.device) -> dict:
    """The table row of one configuration: median step time, ratio to the same-V baseline, memory."""
    runs, base = samples[case], samples[case.baseline]
    ratios = [r[0] / b[0] for r, b in zip(runs, base, strict=True)]
    total_bytes, table_state_bytes = accounted
    memory = max(r[1] for r in runs) if device.type == "cuda" else total_bytes / 2**20
    return {
        "variant": case.variant, "V": case.vocab, "n_e": case.n_e, "table_optimizer": case.table_optimizer,
        "step_ms": round(statistics.median(r[0] for r in runs), 2),
        "vs_baseline": round(statistics.median(ratios), 3),
        "spread": f"{min(ratios):.3f}-{max(ratios):.3f}",
        "table_state_mib": round(table_state_bytes / 2**20, 2),
        "memory_mib": round(memory, 1),
    }  # fmt: skip


def write_results(rows: list[dict], a: argparse.Namespace, device: torch.device, precision: str) -> None:
    """<name>.csv and <name>.md under --out (atomically), and the table on stdout."""
    out = Path(a.out)
    memory = "peak allocated on CUDA" if device.type == "cuda" else "params + grads + optimizer state"
    model = ", ".join(f"{k} {v}" for k, v in QUICK_MODEL.items()) if a.quick else "configs/model/_base.yaml"
    header = (f"{device.type}, {precision}, model {model}, batch {a.batch}, seq_len {a.seq_len}, Zipf({ZIPF_EXPONENT}) "
              f"token ids, {a.warmup} warm-up + {a.repeats} interleaved repeats x {a.steps} steps, "
              f"torch threads {torch.get_num_threads()}; memory_mib: {memory}")  # fmt: skip
    write_table(rows, FIELDS, out, a.name, header)


if __name__ == "__main__":
    main()
