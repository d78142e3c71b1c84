"""Row-sharded token tables (`parallel.tables=row_sharded`, project/table_parallel.py): on 2 CPU ranks (gloo),
forward, loss and every gradient equal one process on the same global batch, and no rank ever holds or builds a
whole table; on one process the exchange path equals the plain model's.

Deselect the 2-rank tests locally with `-m "not distributed"`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from spawn import spawn_ranks
from tensor_asserts import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from project.config import ConfigError, ModelConfig
from project.model import Transformer
from project.table_optim import AdamWWithRowSparseTables, clip_grad_norm_
from project.table_parallel import INIT_CHUNK_ROWS, RowShard, init_rows

VARIANTS = ["jtok", "jtok_m", "moe_jtok_m"]
# V = 51 splits unevenly over 2 ranks (26 + 25 rows), as torch.chunk and DTensor's Shard do.
CFG = dict(vocab_size=51, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, n_routed_experts=4, jtokm_tables=5)
BATCH, WORLD = 4, 2


def _batch() -> torch.Tensor:
    ids = torch.randint(0, CFG["vocab_size"], (BATCH, CFG["max_seq_len"]), generator=torch.Generator().manual_seed(1))
    ids[:, :3] = 50  # an id repeated within and across ranks (the last row of the last rank)
    ids[1, 3:6] = 0
    return ids


def _loss(model: Transformer, ids_BT: torch.Tensor) -> torch.Tensor:
    out = model(ids_BT[:, :-1])
    return F.cross_entropy(out.logits.flatten(0, 1), ids_BT[:, 1:].flatten()) + out.aux_loss


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters() if p.grad is not None}


def _reference(variant: str, folder: Path) -> Path:
    """One process, whole tables, the global batch: weights, ids, loss and gradients, saved for the ranks."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(variant=variant, **CFG))
    model.use_row_sparse_grads(True)
    ids = _batch()
    loss = _loss(model, ids)
    loss.backward()
    path = folder / f"{variant}.pt"
    torch.save({"state": model.state_dict(), "ids": ids, "loss": loss.detach(), "grads": _grads(model)}, path)
    return path


class _LargestTable(TorchDispatchMode):
    """The largest tensor any op produces whose last dimension is d (a table, its rows or their gradients)."""

    def __init__(self, d: int):
        super().__init__()
        self.d, self.largest = d, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.d and not t.is_sparse:
                self.largest = max(self.largest, t.numel())
        return out


def _check_rank(rank: int, variant: str, reference_file: str) -> None:
    ref = torch.load(reference_file, mmap=True)  # mapped, not read: this rank takes its own rows only
    cfg = ModelConfig(variant=variant, **CFG)
    shard = RowShard(cfg.vocab_size, rank=rank, world=WORLD)
    model = Transformer(cfg, deferred_tables=True)
    model.use_row_sparse_grads(True)
    model.shard_token_tables(shard, seed=0)
    model.load_state_dict(ref["state"])
    tables = model.token_tables()
    n_tables = cfg.jtokm_tables if cfg.modulator == "jtok_m" else 1
    table_pool = n_tables * cfg.vocab_size * cfg.d_model
    for table in tables:  # the rows this rank holds: its slice, never the whole table
        assert table.weight.shape == (*table.global_shape[:-2], shard.rows, cfg.d_model)
        assert shard.rows == (26 if rank == 0 else 25) < cfg.vocab_size

    with _LargestTable(cfg.d_model) as largest:
        local_ids = ref["ids"].chunk(WORLD)[rank]
        loss = _loss(model, local_ids)
        loss.backward()
        optimizer = AdamWWithRowSparseTables(
            [{"params": [t.weight for t in tables], "table_optimizer": "adam", "weight_decay": 0.0}], lr=1e-2)
        optimizer.step()
    if n_tables > 1:  # nothing reached a whole JTok-M pool, only its own shard of one (the backbone's tensors are
        # smaller; a JTok [V, d] table has the embedding's shape, so only its held shapes are checked above)
        assert largest.largest <= n_tables * shard.rows * cfg.d_model < table_pool, (largest.largest, table_pool)
    for table in tables:
        state = optimizer.state[table.weight]
        assert state["exp_avg"].shape[0] == n_tables * shard.rows and state["row_step"].numel() == n_tables * shard.rows

    dist.all_reduce(loss.detach_())
    assert_close("loss", loss / WORLD, ref["loss"], atol=1e-6, rtol=1e-5)
    grads = _grads(model)
    table_names = {n for n, p in model.named_parameters() if any(p is t.weight for t in tables)}
    assert set(grads) == set(ref["grads"]), set(grads) ^ set(ref["grads"])
    for name, grad in grads.items():
        expected = ref["grads"][name]
        if name in table_names:  # already averaged over ranks by the exchange: this rank's rows of the global gradient
            expected = expected.narrow(expected.dim() - 2, shard.start, shard.rows)
        else:  # the backbone: averaged as DDP / FSDP would
            dist.all_reduce(grad)
            grad = grad / WORLD
        assert_close(name, grad, expected, atol=1e-6, rtol=1e-4)
    # Clipping's global norm: the backbone's gradients (now averaged on every rank) once, plus every rank's own rows.
    for name, p in model.named_parameters():
        if name not in table_names and p.grad is not None:
            p.grad.div_(WORLD)  # all-reduced (summed) in place above
    norm = clip_grad_norm_(list(model.parameters()), 1e9, sharded_tables=True)
    want = torch.stack([g.double().square().sum() for g in ref["grads"].values()]).sum().sqrt().float()
    assert_close("global gradient norm", norm, want, atol=1e-6, rtol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_match_one_process_on_the_same_global_batch(variant, tmp_path):
    spawn_ranks(WORLD, _check_rank, variant, str(_reference(variant, tmp_path)), folder=tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_rank_exchange_equals_the_plain_model(variant):
    """World 1: the route, fetch and pre-mix run without a process group and give the plain model's numbers."""
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, **CFG)
    plain = Transformer(cfg)
    plain.use_row_sparse_grads(True)
    sharded = Transformer(cfg, deferred_tables=True)
    sharded.use_row_sparse_grads(True)
    sharded.shard_token_tables(RowShard(cfg.vocab_size), seed=0)
    sharded.load_state_dict(plain.state_dict())
    ids = _batch()
    losses = []
    for model in (plain, sharded):
        losses.append(_loss(model, ids))
        losses[-1].backward()
    assert_close("loss", losses[1], losses[0], atol=1e-6, rtol=1e-6)
    a, b = _grads(plain), _grads(sharded)
    assert set(a) == set(b)
    for name in a:
        assert_close(name, b[name], a[name], atol=1e-6, rtol=1e-5)
    assert sharded.table_exchange.bytes_sent == 0  # nothing leaves a single process


def test_initial_rows_do_not_depend_on_the_world_size():
    """Each rank draws its own rows only, and they are the rows one process draws (equal by construction: the same
    seeded generator per chunk of rows, so compared exactly)."""
    shape = (3, 2 * INIT_CHUNK_ROWS + 5, 4)
    whole = init_rows(shape, RowShard(shape[1]), std=2.0, seed=7)
    for world in (2, 3, 5):
        parts = [init_rows(shape, RowShard(shape[1], rank=r, world=world), std=2.0, seed=7) for r in range(world)]
        assert torch.equal(torch.cat(parts, dim=1), whole)
    assert 1.9 < whole.std().item() < 2.1


def test_a_vocabulary_too_small_for_the_ranks_is_refused():
    with pytest.raises(ConfigError, match="cannot give each of 4 ranks rows of its own"):
        RowShard(9, rank=0, world=4)  # ceil(9 / 4) = 3 rows each: the 4th rank would own none


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tables=row_sharded", "trainer=ddp"], "would save rank 0's rows only"),
    (["parallel.tables=row_sharded", "trainer.devices=2"], "strategy=auto on trainer.devices=2 would save rank 0"),
    (["parallel.tables=row_sharded", "optim.table_optimizer=adamw"], "set optim.table_optimizer=adam or rowwise_adam"),
    (["parallel.tables=sideways"], "parallel.tables='sideways' is not one of strategy, row_sharded"),
])  # fmt: skip
def test_a_table_mode_that_cannot_run_fails_before_any_work(overrides, message, make_cfg, tmp_path):
    from project.pipeline import train

    with pytest.raises(ConfigError, match=message):
        train(make_cfg("model=jtok_m", *overrides))
    assert not (tmp_path / "run").exists()


def test_a_one_process_row_sharded_run_writes_an_ordinary_checkpoint_resumed_in_its_own_mode(make_cfg, tmp_path):
    from project.checkpoint import load_model
    from project.pipeline import train

    summary = train(make_cfg("model=jtok_m", "parallel.tables=row_sharded", "trainer.max_steps=2")).summary
    tables = summary["tables"]
    assert (tables["mode"], tables["world"], tables["bytes_sent_per_step"]) == ("row_sharded", 1, 0.0)
    cfg = ModelConfig.from_dict(summary["model"])
    pool = cfg.n_layers * cfg.jtokm_tables * cfg.vocab_size * cfg.d_model * 4  # bytes of every table, float32
    assert tables["held_bytes_per_rank"] > 3 * pool  # the tables, Adam's two moments and the row counts
    assert tables["fsdp_bytes_per_step"] == 0  # one rank: FSDP would send nothing either
    loaded = load_model(summary["checkpoint"]).model  # the whole tables, loadable without the exchange
    assert loaded.layers[0].jtok_m.tables.weight.shape == (cfg.jtokm_tables, cfg.vocab_size, cfg.d_model)
    # Resuming switches no table mode: the optimizer state is laid out per mode.
    with pytest.raises(ConfigError, match="parallel.tables: checkpoint 'row_sharded' vs config 'strategy'"):
        train(make_cfg("model=jtok_m", "trainer.max_steps=4", f"ckpt_path={summary['checkpoint']}",
                       run_dir=tmp_path / "resumed"))  # fmt: skip


@pytest.mark.parametrize("variant", ["jtok", "jtok_m"])
def test_row_sharded_tables_under_compiled_blocks_match_eager(variant):
    """`parallel.compile` with row-sharded tables: the exchange runs eagerly (a graph break, `torch.compiler.disable`)
    inside compiled blocks; gradients equal eager ones (aot_eager replays the same aten ops: round-off only)."""
    cfg = ModelConfig(variant=variant, **CFG)
    models = []
    for _ in range(2):
        model = Transformer(cfg, deferred_tables=True)
        model.use_row_sparse_grads(True)
        model.shard_token_tables(RowShard(cfg.vocab_size), seed=0)
        models.append(model)
    eager, compiled = models
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.layers:
        block.compile(backend="aot_eager")
    for step in range(2):  # a second batch of other unique ids runs without failing a guard on the route
        ids = torch.randint(0, cfg.vocab_size, (BATCH, CFG["max_seq_len"]), generator=torch.Generator().manual_seed(step))
        grads = []
        for model in (eager, compiled):
            model.zero_grad()
            _loss(model, ids).backward()
            grads.append(_grads(model))
        assert set(grads[0]) == set(grads[1])
        for name in grads[0]:
            assert_close(name, grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def _save_two_ranks(rank: int, folder: str) -> None:
    """One step of jtok_m's row-sharded tables with rowwise Adam on 2 ranks, then a distributed checkpoint (as
    Lightning's ModelParallelStrategy writes it) and each rank's own rows and state, to compare with."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    model, optimizer = _sharded_with_optimizer(mesh)
    _loss(model, _batch().chunk(WORLD)[rank]).backward()
    optimizer.step()
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=folder)
    table = model.layers[0].jtok_m.tables.weight
    torch.save({"rows": table.detach(), "state": dict(optimizer.state[table])}, f"{folder}/rank{rank}.pt")


def _load_one_rank(rank: int, folder: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    model, optimizer = _sharded_with_optimizer(init_device_mesh("cpu", (1,)))
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    saved = [torch.load(f"{folder}/rank{r}.pt") for r in range(WORLD)]
    table = model.layers[0].jtok_m.tables.weight
    # The one rank holds both ranks' rows, of the table and of each per-row state, in order (copied: exact).
    assert torch.equal(table.detach(), torch.cat([s["rows"] for s in saved], dim=1))
    state = optimizer.state[table]
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        n_e = table.shape[0]
        parts = [s["state"][key].reshape(n_e, -1, *s["state"][key].shape[1:]) for s in saved]
        assert torch.equal(state[key], torch.cat(parts, dim=1).reshape(state[key].shape)), key
    assert int(state["step"]) == 1


def _sharded_with_optimizer(mesh):
    cfg = ModelConfig(variant="jtok_m", **CFG)
    model = Transformer(cfg, deferred_tables=True)
    model.use_row_sparse_grads(True)
    model.shard_token_tables(RowShard(cfg.vocab_size, mesh.get_local_rank(), mesh.size(), mesh.get_group(), mesh), 0)
    tables = [t.weight for t in model.token_tables()]
    others = [p for p in model.parameters() if all(p is not t for t in tables)]
    optimizer = AdamWWithRowSparseTables(
        [{"params": others}, {"params": tables, "table_optimizer": "rowwise_adam", "weight_decay": 0.0}], lr=1e-2)
    return model, optimizer


@pytest.mark.distributed
def test_a_sharded_checkpoint_re_shards_onto_another_world_size(tmp_path):
    """Rows and their optimizer state are saved as rows of the global tables, so a checkpoint of 2 ranks loads
    onto 1 (each rank reads the rows it now owns)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    spawn_ranks(WORLD, _save_two_ranks, str(folder), folder=tmp_path)
    spawn_ranks(1, _load_one_rank, str(folder), folder=tmp_path)


def _bf16_fsdp_one_rank(rank: int) -> None:
    """FSDP2 computing in bf16: row-sharded JTok rows reach the gate in float32, as a local (ignored) table's do, so
    the tables' gradients equal those of the tables kept whole on the rank."""
    from torch.distributed.device_mesh import init_device_mesh

    from project.parallel import apply_fsdp

    mesh = init_device_mesh("cpu", (1,))
    cfg = ModelConfig(variant="jtok", **CFG)
    torch.manual_seed(0)
    whole = Transformer(cfg)
    sharded = Transformer(cfg, deferred_tables=True)
    sharded.shard_token_tables(RowShard(cfg.vocab_size, 0, 1, mesh.get_group(), mesh), seed=0)
    sharded.load_state_dict(whole.state_dict())
    grads, rows = [], []
    for model in (whole, sharded):
        model.use_row_sparse_grads(True)
        apply_fsdp(model, mesh, param_dtype="bfloat16", row_sparse_tables=True)
        for block in model.layers:  # what reaches the JTok unit: rows given by the exchange, or none (own table)
            block.jtok.register_forward_pre_hook(lambda module, args: rows.append(args[3] if len(args) > 3 else None))
        _loss(model, _batch()).backward()
        grads.append([t.weight.grad.to_dense() for t in model.token_tables()])
    assert len(rows) == 2 * cfg.n_layers and rows[: cfg.n_layers] == [None] * cfg.n_layers
    assert all(r.tensor.dtype == torch.float32 for r in rows[cfg.n_layers :])  # not cast to bf16 on the way in
    for layer, (want, got) in enumerate(zip(*grads)):
        # The same bf16 backbone ops on both sides and float32 rows either way (seen equal). Gradients are ~1e-5:
        # rows rounded to bf16 would move them by ~1e-3 of that, beyond this bound.
        assert_close(f"layer {layer} table", got, want, atol=1e-9, rtol=1e-5)


@pytest.mark.distributed
def test_row_sharded_rows_keep_the_tables_dtype_under_fsdp_mixed_precision(tmp_path):
    spawn_ranks(1, _bf16_fsdp_one_rank, folder=tmp_path)
