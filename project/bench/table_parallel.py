"""Per-rank token-table memory and bytes sent per training step, row-sharded tables vs FSDP2, on `--world` CPU ranks
(gloo): `python -m project.bench.table_parallel`.

Three ways to hold the tables under FSDP2 (the backbone is FSDP2-sharded alike in all three):
- `fsdp`: the tables are FSDP2 parameters (`optim.table_optimizer=adamw`): every step all-gathers each layer's
  tables for forward and again for backward (resharded after forward) and reduce-scatters their dense gradients;
- `replicated`: today's default with a row-sparse optimizer (`adam`): every rank holds every table whole and
  all-gathers the touched rows' gradients (`project.table_optim.all_gather_row_grads`);
- `row_sharded` (`parallel.tables=row_sharded`): each rank owns 1/world of every table's rows; ids, routing weights
  and d-vectors cross ranks (`project.table_parallel`).

A step is forward, cross-entropy + aux loss, backward, the row exchange where the mode has one, clipping
(`project.table_optim.clip_grad_norm_`) and the optimizer step. Bytes are counted by wrapping torch.distributed's
collectives in every rank: what this rank sends to the others (a ring all-gather or reduce-scatter sends
(world - 1) / world of the whole tensor, an all-reduce twice that, an all-to-all what leaves for other ranks).
`tables_sent`: the tables' share; for `fsdp` it is the step's total less the backbone's (the `row_sharded` step's
total less its exchange: the backbone's collectives are the same in both), the analytic
`project.accounting.fsdp_table_bytes_per_step` beside it. `tables_held`: the tables and their optimizer state on
one rank (local shards), after a step. Steps are averaged over `--steps` after one warm-up; max over ranks.

Token ids are drawn as in `project.bench.train_step` (Zipf(1.1) over the V ids, fixed seed, another batch per rank).
Model: ModelConfig's defaults (configs/model/_base.yaml: d 128, 4 layers, n_e 5 top-2), batch 16 x 128 per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from project.accounting import fsdp_table_bytes_per_step
from project.bench import write_table
from project.bench.train_step import tensor_bytes, zipf_batches
from project.config import ModelConfig
from project.model import Transformer
from project.optim import OptimConfig, build_optimizer
from project.parallel import apply_fsdp
from project.table_optim import all_gather_row_grads, clip_grad_norm_
from project.table_parallel import RowShard, table_bytes_held

MODES = ("fsdp", "replicated", "row_sharded")
FIELDS = ["variant", "V", "mode", "tables_held_mib", "held_vs_fsdp", "tables_sent_kib", "sent_vs_fsdp",
          "fsdp_analytic_kib", "step_sent_kib"]  # fmt: skip
MIB, KIB = 2**20, 2**10


class SentBytes:
    """Bytes this rank sends through torch.distributed's collectives while installed (`counting`)."""

    COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
                   "reduce_scatter_tensor", "all_reduce", "all_to_all_single")  # fmt: skip

    def __init__(self, world: int, rank: int):
        self.world, self.rank, self.total = world, rank, 0

    def _sent(self, name: str, fn, args: tuple, kwargs: dict) -> float:
        a = inspect.signature(fn).bind(*args, **kwargs).arguments
        w = self.world
        if name == "all_to_all_single":
            inp, splits = a["input"], a.get("input_split_sizes")
            if not splits:
                return tensor_bytes(inp) * (w - 1) / w
            return (sum(splits) - splits[self.rank]) * tensor_bytes(inp) / max(1, inp.shape[0])
        if name.startswith("all_gather"):
            return tensor_bytes(a.get("input_tensor", a.get("tensor"))) * (w - 1)
        if name.startswith("reduce_scatter"):
            return tensor_bytes(a["input"]) * (w - 1) / w
        return 2 * tensor_bytes(a["tensor"]) * (w - 1) / w  # all_reduce

    @contextlib.contextmanager
    def counting(self):
        originals = {name: getattr(dist, name) for name in self.COLLECTIVES}

        def wrap(name, fn):
            @functools.wraps(fn)
            def counted(*args, **kwargs):
                self.total += self._sent(name, fn, args, kwargs)
                return fn(*args, **kwargs)

            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)


def build(variant: str, vocab: int, mode: str, mesh, seq_len: int):
    """The model of one mode on this rank, FSDP2-wrapped, and its optimizer."""
    cfg = ModelConfig.from_dict(dict(variant=variant, vocab_size=vocab, max_seq_len=seq_len))
    optim = OptimConfig.from_dict({"table_optimizer": "adamw" if mode == "fsdp" else "adam"})
    torch.manual_seed(0)
    model = Transformer(cfg, deferred_tables=mode == "row_sharded")
    model.use_row_sparse_grads(optim.row_sparse_tables)
    if mode == "row_sharded":
        shard = RowShard(vocab, rank=mesh.get_local_rank(), world=mesh.size(), group=mesh.get_group(), mesh=mesh)
        model.shard_token_tables(shard, seed=0)
    apply_fsdp(model, mesh, row_sparse_tables=optim.row_sparse_tables)
    optimizer, _ = build_optimizer(model, optim, max_steps=100)
    return cfg, model, optimizer


def train_step(model: Transformer, optimizer, mode: str, inputs_BT, targets_BT, counter: SentBytes) -> float:
    """One step; returns the bytes the tables' own exchange sent (row exchange or row-sharded lookups: also in
    `counter.total`, which counts every collective)."""
    out = model(inputs_BT)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets_BT.flatten()) + out.aux_loss
    loss.backward()
    before = counter.total
    if mode == "replicated":
        all_gather_row_grads([t.weight for t in model.token_tables()])
    exchanged = counter.total - before
    if model.table_exchange is not None:  # its own count of its all-to-alls
        exchanged += model.table_exchange.bytes_sent
        model.table_exchange.bytes_sent = 0
    clip_grad_norm_(list(model.parameters()), 1.0, sharded_tables=mode == "row_sharded")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return exchanged


def measure(args, rank: int, world: int) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    counter = SentBytes(world, rank)
    rows = []
    for variant in args.variants:
        for vocab in args.vocabs:
            batches = zipf_batches(vocab, args.batch, args.seq_len, args.steps + 1, seed=1000 * rank + vocab)
            results = {}
            for mode in MODES:
                cfg, model, optimizer = build(variant, vocab, mode, mesh, args.seq_len)
                step_sent = tables_sent = 0.0
                for i, (inputs_BT, targets_BT) in enumerate(batches):
                    with counter.counting():
                        counter.total = 0
                        exchanged = train_step(model, optimizer, mode, inputs_BT, targets_BT, counter)
                    if i > 0:  # the first step is a warm-up (optimizer state created)
                        step_sent += counter.total / args.steps
                        tables_sent += exchanged / args.steps
                held = table_bytes_held([t.weight for t in model.token_tables()], optimizer.state)
                stats = torch.tensor([held, step_sent, tables_sent], dtype=torch.float64)
                dist.all_reduce(stats, op=dist.ReduceOp.MAX)
                results[mode] = [float(x) for x in stats]
                del model, optimizer
            backbone = results["row_sharded"][1] - results["row_sharded"][2]
            results["fsdp"][2] = results["fsdp"][1] - backbone
            analytic = fsdp_table_bytes_per_step(cfg, world)
            for mode in MODES:
                held, step_sent, sent = results[mode]
                rows.append({
                    "variant": variant, "V": vocab, "mode": mode,
                    "tables_held_mib": f"{held / MIB:.2f}",
                    "held_vs_fsdp": f"{held / results['fsdp'][0]:.2f}",
                    "tables_sent_kib": f"{sent / KIB:.1f}",
                    "sent_vs_fsdp": f"{sent / results['fsdp'][2]:.3f}",
                    "fsdp_analytic_kib": f"{analytic / KIB:.1f}",
                    "step_sent_kib": f"{step_sent / KIB:.1f}",
                })  # fmt: skip
    return rows


def _rank(rank: int, args, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world)
    try:
        rows = measure(args, rank, args.world)
        if rank == 0:
            header = (f"{args.world} CPU ranks (gloo), fp32, model ModelConfig defaults (d 128, 4 layers, n_e 5 top-2), "
                      f"batch {args.batch} x {args.seq_len} per rank, Zipf(1.1) ids, {args.steps} steps after 1 warm-up; "
                      f"per rank, max over ranks")  # fmt: skip
            write_table(rows, FIELDS, Path(args.out), "table_parallel", header)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m project.bench.table_parallel", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["jtok", "jtok_m"])
    parser.add_argument("--vocabs", nargs="+", type=int, default=[2048, 32768])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="docs/results/table_parallel")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(args, str(Path(tmp) / "init")), nprocs=args.world, join=True,
                           start_method="spawn")  # fmt: skip


if __name__ == "__main__":
    main()
