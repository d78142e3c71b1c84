"""Row-sparse token tables on 2 CPU ranks (gloo): DDP and FSDP2 match one process on the same global batch,
a sharded checkpoint resumes on the same trajectory, and only touched rows cross between ranks (the tables
are neither all-reduced by DDP nor sharded by FSDP). Row-sharded tables (`parallel.tables=row_sharded`) under
FSDP2 match one process and resume bit-identically.

Deselect locally with `-m "not distributed"`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from spawn import spawn_ranks
from test_distributed import STEPS, assert_same_run, losses, run, two_ranks, weights

from kernels.reference import row_sparse_grad
from project.checkpoint import is_sharded_checkpoint
from project.config import ModelConfig
from project.table_optim import all_gather_row_grads

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SPARSE = "optim.table_optimizer=adam"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist_tables_cache")


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, cache):
    """One-process runs on the global batch, one per variant, shared by the strategies."""
    done: dict[str, tuple[Path, dict]] = {}

    def get(variant: str) -> tuple[Path, dict]:
        if variant not in done:
            folder = tmp_path_factory.mktemp(f"single_{variant}")
            done[variant] = folder, run(folder, cache, f"model={variant}", SPARSE, "data.batch_size=4")
        return done[variant]

    return get


@pytest.mark.parametrize(
    "variant, strategy", [("jtok", "ddp"), ("jtok_m", "ddp"), ("jtok_m", "fsdp"), ("moe_jtok_m", "fsdp")]
)
def test_row_sparse_tables_match_one_process_on_the_same_global_batch(variant, strategy, single_runs, cache, tmp_path):
    single_dir, single = single_runs(variant)
    multi = run(tmp_path, cache, f"model={variant}", SPARSE, *two_ranks(strategy))
    assert_same_run(single_dir, tmp_path)
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    a, b = weights(Path(single["checkpoint"])), weights(Path(multi["checkpoint"]))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4, msg=name)


def test_row_sparse_sharded_checkpoint_resumes_on_the_same_trajectory(cache, tmp_path):
    overrides = ["model=jtok_m", "optim.table_optimizer=rowwise_adam", *two_ranks("fsdp"),
                 "checkpoint.every_n_train_steps=3", "checkpoint.keep_all=true"]  # fmt: skip
    full = run(tmp_path / "full", cache, *overrides)
    resumed = run(tmp_path / "resumed", cache, *overrides, f"ckpt_path={tmp_path / 'full/checkpoints/step0000003.ckpt'}")
    assert set(losses(tmp_path / "resumed")) == {3, 4, 5}
    assert_same_run(tmp_path / "full", tmp_path / "resumed", steps=range(3, STEPS))
    a, b = weights(Path(full["checkpoint"])), weights(Path(resumed["checkpoint"]))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)


def _check_exchange_and_wrapping(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from project.lit_module import LMModule
    from project.parallel import apply_fsdp

    # The exchange: each rank's rows, averaged over ranks; a row only one rank touched is kept.
    keys = {0: ([0, 2, 2], [1, 9, 9]), 1: ([2, 6, 5], [9, 3, 0])}  # per rank, per table (rows of the flattened table)

    def rank_grad(r: int, i: int) -> torch.Tensor:
        return torch.randn(3, 3, generator=torch.Generator().manual_seed(10 * r + i))

    tables = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(2, 5, 3))]
    expected = [torch.zeros_like(t) for t in tables]
    for r in range(world):
        for i, e in enumerate(expected):
            e.view(-1, 3).index_add_(0, torch.tensor(keys[r][i]), rank_grad(r, i) / world)
    for i, t in enumerate(tables):
        t.grad = row_sparse_grad(torch.tensor(keys[rank][i]), rank_grad(rank, i), t)
    all_gather_row_grads(tables)
    for i, (t, e) in enumerate(zip(tables, expected)):
        assert t.grad.is_sparse
        torch.testing.assert_close(t.grad.to_dense(), e, atol=1e-6, rtol=1e-6)
        touched = {k for r in range(world) for k in keys[r][i]}
        assert t.grad.coalesce().values().shape[0] == len(touched)

    cfg = dict(variant="jtok_m", vocab_size=32, d_model=8, n_layers=2, n_heads=2, max_seq_len=8)
    # DDP leaves the tables to the row exchange.
    module = LMModule(ModelConfig(**cfg), optim={"table_optimizer": "adam"})
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    table_names = {n for n, p in module.named_parameters() if any(p is t.weight for t in module.model.token_tables())}
    assert table_names and table_names <= set(ddp.parameters_to_ignore)
    # FSDP2 shards everything but the tables, which stay whole on every rank.
    model = LMModule(ModelConfig(**cfg), optim={"table_optimizer": "adam"}).model
    apply_fsdp(model, init_device_mesh("cpu", (world,)), row_sparse_tables=True)
    tables = {id(t.weight) for t in model.token_tables()}
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) != (id(p) in tables), name
        if id(p) in tables:
            assert p.shape == (ModelConfig(**cfg).jtokm_tables, 32, 8)


def test_only_touched_rows_cross_ranks_and_no_strategy_reduces_the_tables(tmp_path):
    spawn_ranks(2, _check_exchange_and_wrapping, 2, folder=tmp_path)


ROW_SHARDED = "parallel.tables=row_sharded"


@pytest.mark.parametrize("variant", ["jtok", "jtok_m", "moe_jtok_m"])
def test_row_sharded_tables_on_two_ranks_match_one_process_on_the_same_global_batch(variant, cache, tmp_path):
    """One process holds every row (world 1: the same exchange path, nothing sent); two ranks hold half each. Both
    start from the same tables (`init_rows` draws rows by seed, whatever the world size)."""
    single = run(tmp_path / "single", cache, f"model={variant}", ROW_SHARDED, "data.batch_size=4")
    multi = run(tmp_path / "multi", cache, f"model={variant}", ROW_SHARDED, *two_ranks("fsdp"))
    assert_same_run(tmp_path / "single", tmp_path / "multi")
    assert multi["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    a, b = weights(Path(single["checkpoint"])), weights(Path(multi["checkpoint"]))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=2e-5, rtol=1e-4, msg=name)
    one, two = single["tables"], multi["tables"]
    assert (one["mode"], one["world"], one["bytes_sent_per_step"]) == ("row_sharded", 1, 0.0)
    assert (two["mode"], two["world"]) == ("row_sharded", 2) and two["bytes_sent_per_step"] > 0
    # Each rank holds its half of the rows and of their optimizer state (V = 384 splits evenly); only the
    # optimizer's per-table step counters are whole on both.
    assert two["held_bytes_per_rank"] == pytest.approx(one["held_bytes_per_rank"] / 2, rel=1e-3)


def test_row_sharded_checkpoint_resumes_bit_identically(cache, tmp_path):
    overrides = ["model=moe_jtok_m", ROW_SHARDED, *two_ranks("fsdp"), "checkpoint.every_n_train_steps=3",
                 "checkpoint.keep_all=true"]  # fmt: skip
    full = run(tmp_path / "full", cache, *overrides)
    midway = tmp_path / "full/checkpoints/step0000003.ckpt"
    assert is_sharded_checkpoint(midway)
    resumed = run(tmp_path / "resumed", cache, *overrides, f"ckpt_path={midway}")
    a, b = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert set(b) == {3, 4, 5}
    # Bit-identical by construction: the same ranks redo the same float32 operations in the same order from exact
    # copies of every rank's rows, their optimizer state, the backbone's shards and the sampler position.
    assert all(b[step] == a[step] for step in (3, 4, 5)), (a, b)
    wa, wb = weights(Path(full["checkpoint"])), weights(Path(resumed["checkpoint"]))
    assert all(torch.equal(wa[name], wb[name]) for name in wa)
