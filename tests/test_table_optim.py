"""Row-sparse training of the token tables (project/table_optim.py): lazy Adam and row-wise Adam against torch's
AdamW and hand computations, lazy semantics, bf16 state and its round trip, clipping of mixed dense + sparse
gradients, gradient accumulation through the model, and the row-sparse optimizers through the train stage."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import offline_env, run_py
from test_model import tiny
from test_train import train_losses

from kernels.reference import gather_rows, row_sparse_grad
from project.checkpoint import read_checkpoint
from project.config import ConfigError
from project.table_optim import AdamWWithRowSparseTables, clip_grad_norm_, clip_grad_value_
from stages import train

BETAS, EPS = (0.9, 0.95), 1e-8
# float32 Adam against float32 Adam (torch's AdamW, or a float64 hand computation rounded once): the two order
# the same few operations differently (bias corrections as a float32 tensor vs a Python float, lr folded into the
# denominator vs into the step size), so an update of size ~lr differs by a few ulp of the O(1) parameter.
ATOL, RTOL = 2e-6, 1e-6  # measured: <= 2.4e-7 after 6 steps of lr 1e-2
ROW_STATE = ("exp_avg", "exp_avg_sq", "row_step")  # a table's per-row state (a scalar `step` may sit beside it)


def table_optimizer(p: torch.Tensor, kind: str, lr: float, weight_decay: float = 0.0, state_dtype: str = "float32",
                    dense: list[torch.Tensor] | None = None) -> AdamWWithRowSparseTables:  # fmt: skip
    """The optimizer with one table group (and, given `dense`, one dense AdamW group before it)."""
    groups = [{"params": dense, "weight_decay": 0.1}] if dense else []
    groups.append({"params": [p], "table_optimizer": kind, "state_dtype": state_dtype, "weight_decay": weight_decay})
    return AdamWWithRowSparseTables(groups, lr=lr, betas=BETAS, eps=EPS)


def sparse_grad(table: torch.Tensor, keys: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A row-sparse gradient of `table.view(-1, d)[keys]` for a random upstream gradient (repeated keys are summed)."""
    return row_sparse_grad(keys, torch.randn(keys.numel(), table.shape[-1], generator=gen), table)


def state_bytes(state: dict, keys=None) -> int:
    return sum(t.numel() * t.element_size() for k, t in state.items() if torch.is_tensor(t) and k in (keys or state))


@pytest.mark.parametrize("shape", [(12, 16), (3, 12, 16)], ids=["V_d", "n_e_V_d"])
def test_lazy_adam_touching_every_row_equals_torch_adamw(shape):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    p0 = p.detach().clone()
    ours = table_optimizer(p, "adam", lr=1e-2)
    theirs = torch.optim.AdamW([q], lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False)
    R = p.numel() // shape[-1]
    for step in range(1, 7):
        # Every row at least once, some twice (summed), in shuffled order.
        keys = torch.cat([torch.randperm(R, generator=gen), torch.randint(0, R, (R,), generator=gen)])
        p.grad = sparse_grad(p, keys, gen)
        q.grad = p.grad.to_dense()
        ours.step()
        theirs.step()
        torch.testing.assert_close(p.detach(), q.detach(), atol=ATOL, rtol=RTOL, msg=f"step {step}")
        state, ref = ours.state[p], theirs.state[q]
        torch.testing.assert_close(state["exp_avg"], ref["exp_avg"].reshape(R, -1), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(state["exp_avg_sq"], ref["exp_avg_sq"].reshape(R, -1), atol=1e-8, rtol=1e-6)
        assert torch.equal(state["row_step"], torch.full((R,), float(step)))
    assert (p.detach() - p0).abs().mean() > 1e-3  # the updates are far above the tolerance


def test_lazy_adam_leaves_untouched_rows_and_their_state_alone_and_counts_steps_per_row():
    """Untouched rows and their state are bit-identical by construction (the step writes only the touched rows
    with index_copy_), so torch.equal is the check. Row 7 is first touched at step 5: its update must be a fresh
    Adam step (its own row_step 1 in the bias corrections), i.e. one torch AdamW step on that row alone."""
    gen = torch.Generator().manual_seed(2)
    V, d, lr = 10, 6, 1e-2
    p = torch.nn.Parameter(torch.randn(V, d, generator=gen))
    opt = table_optimizer(p, "adam", lr=lr)
    schedule = [[0, 1, 2, 0], [0, 3], [1, 3, 4, 4], [0], [7, 0, 3, 7]]  # repeats are summed
    counts = torch.zeros(V)
    for step, touched in enumerate(schedule, start=1):
        keys = torch.tensor(touched)
        p.grad = sparse_grad(p, keys, gen)
        before = p.detach().clone()
        state_before = {k: opt.state[p][k].clone() for k in ROW_STATE if k in opt.state[p]}
        opt.step()
        hit = torch.zeros(V, dtype=torch.bool)
        hit[keys] = True
        counts[hit] += 1
        assert torch.equal(p.detach()[~hit], before[~hit]), f"step {step}: an untouched row moved"
        assert (p.detach()[hit] != before[hit]).any(-1).all(), f"step {step}: a touched row did not move"
        for key, value in state_before.items():
            assert torch.equal(opt.state[p][key][~hit], value[~hit]), f"step {step}: {key} of an untouched row"
        assert torch.equal(opt.state[p]["row_step"], counts), step
        if step == 5:
            row = torch.nn.Parameter(before[7].clone())
            row.grad = p.grad.to_dense()[7]
            torch.optim.AdamW([row], lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, foreach=False).step()
            torch.testing.assert_close(p.detach()[7], row.detach(), atol=ATOL, rtol=RTOL)
    never = counts == 0  # rows 5, 6, 8, 9: never written, state still zero
    assert never.sum() == 4 and (opt.state[p]["exp_avg"][never] == 0).all()


def hand_adam(p0_RD, grads, lr, wd, rowwise):
    """Decoupled-weight-decay Adam in float64 on the touched rows only, per-row steps; `rowwise`: one second
    moment per row (the mean of g^2 over the row). `grads`: one dense [R, d] gradient per step (0 rows untouched)."""
    p, m = p0_RD.double().clone(), torch.zeros_like(p0_RD, dtype=torch.float64)
    v = torch.zeros(p.shape[0] if rowwise else p.shape, dtype=torch.float64)
    t = torch.zeros(p.shape[0], dtype=torch.float64)
    b1, b2 = BETAS
    for g in grads:
        g = g.double()
        hit = (g != 0).any(-1)
        t[hit] += 1
        p[hit] *= 1 - lr * wd
        m[hit] = b1 * m[hit] + (1 - b1) * g[hit]
        v[hit] = b2 * v[hit] + (1 - b2) * (g[hit].square().mean(-1) if rowwise else g[hit].square())
        v_hat = (v[hit] / (1 - b2 ** t[hit]))[:, None] if rowwise else v[hit] / (1 - b2 ** t[hit])[:, None]
        p[hit] -= lr * (m[hit] / (1 - b1 ** t[hit])[:, None]) / (v_hat.sqrt() + EPS)
    return p, m, v, t


@pytest.mark.parametrize("kind", ["adam", "rowwise_adam"])
def test_touched_rows_take_decoupled_weight_decay_and_the_hand_computed_update(kind):
    """p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps) on the touched rows, against float64 by hand; the
    untouched rows take no decay (torch.equal)."""
    gen = torch.Generator().manual_seed(3)
    V, d, lr, wd = 9, 7, 5e-2, 0.5  # lr * wd = 2.5%: a decay applied to the wrong rows or coupled shows at once
    p = torch.nn.Parameter(torch.randn(V, d, generator=gen) * 2)
    p0 = p.detach().clone()
    opt = table_optimizer(p, kind, lr=lr, weight_decay=wd)
    grads = []
    for touched in ([1, 2, 5, 5], [2, 6], [1, 6, 8]):
        p.grad = sparse_grad(p, torch.tensor(touched), gen)
        grads.append(p.grad.to_dense())
        opt.step()
    want_p, want_m, want_v, want_t = hand_adam(p0, grads, lr, wd, rowwise=kind == "rowwise_adam")
    torch.testing.assert_close(p.detach().double(), want_p, atol=ATOL, rtol=RTOL)
    state = opt.state[p]
    torch.testing.assert_close(state["exp_avg"].double(), want_m, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].double(), want_v, atol=1e-7, rtol=1e-6)
    assert torch.equal(state["row_step"].double(), want_t)
    untouched = torch.tensor([0, 3, 4, 7])
    assert torch.equal(p.detach()[untouched], p0[untouched])
    assert state["exp_avg"].shape == (V, d) and state["row_step"].shape == (V,)
    assert state["exp_avg_sq"].shape == ((V,) if kind == "rowwise_adam" else (V, d))


def test_rowwise_adam_state_is_about_half_of_adamw_at_d_128():
    """exp_avg [R, d] + exp_avg_sq [R] + row_step [R] vs AdamW's two [R, d] moments (+ a scalar step): 520/1024."""
    gen = torch.Generator().manual_seed(4)
    R, d = 64, 128
    p = torch.nn.Parameter(torch.randn(R, d, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    ours = table_optimizer(p, "rowwise_adam", lr=1e-2)
    theirs = torch.optim.AdamW([q], lr=1e-2)
    p.grad = sparse_grad(p, torch.arange(R), gen)
    q.grad = p.grad.to_dense()
    ours.step()
    theirs.step()
    assert state_bytes(ours.state[p]) <= 0.55 * state_bytes(theirs.state[q])
    assert state_bytes(ours.state[p], ROW_STATE) == R * (4 * d + 4 + 4)


def round_trip(state_dict: dict) -> dict:
    """The optimizer state through torch.save / torch.load, as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["adam", "rowwise_adam"])
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_state_keeps_its_dtype_and_resuming_from_a_state_dict_is_bit_identical(kind, state_dtype):
    """N steps, state_dict, then M more steps, against a fresh optimizer (on copies of the parameters) loading
    that state dict and taking the same M steps: torch.equal on parameters and state. torch's load_state_dict
    casts floating state to the parameter's dtype (fp32); the optimizer's load_state_dict must put bf16 back."""
    gen = torch.Generator().manual_seed(5)
    V, d, N, M = 11, 8, 3, 3
    w = torch.nn.Parameter(torch.randn(4, 5, generator=gen))
    p = torch.nn.Parameter(torch.randn(2, V, d, generator=gen))
    opt = table_optimizer(p, kind, lr=1e-2, weight_decay=0.01, state_dtype=state_dtype, dense=[w])
    keys = [torch.randint(0, 2 * V, (9,), generator=gen) for _ in range(N + M)]
    steps = [(torch.randn(4, 5, generator=gen), k, torch.randn(9, d, generator=gen)) for k in keys]

    def take(optimizer, table, dense, step_grads):
        for g_w, keys_U, rows_UD in step_grads:
            dense.grad, table.grad = g_w.clone(), row_sparse_grad(keys_U, rows_UD, table)
            optimizer.step()

    take(opt, p, w, steps[:N])
    want = getattr(torch, state_dtype)
    assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == want
    assert opt.state[p]["row_step"].dtype == torch.float32
    saved = round_trip(opt.state_dict())
    w2, p2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, p))
    fresh = table_optimizer(p2, kind, lr=1e-2, weight_decay=0.01, state_dtype=state_dtype, dense=[w2])
    fresh.load_state_dict(saved)
    assert fresh.state[p2]["exp_avg"].dtype == fresh.state[p2]["exp_avg_sq"].dtype == want
    assert fresh.state[p2]["row_step"].dtype == torch.float32
    take(opt, p, w, steps[N:])
    take(fresh, p2, w2, steps[N:])
    assert torch.equal(p.detach(), p2.detach()) and torch.equal(w.detach(), w2.detach())
    assert set(fresh.state[p2]) == set(opt.state[p]) >= set(ROW_STATE)
    for key, value in opt.state[p].items():
        assert torch.equal(fresh.state[p2][key], value), key
    assert fresh.state[p2]["exp_avg"].dtype == want  # still, after steps on the loaded state


def two_pass_grad(table: torch.Tensor, gen: torch.Generator, duplicates: bool) -> torch.Tensor:
    """The table's sparse gradient after two backward passes through `gather_rows` (accumulated by autograd: torch
    flags the sum uncoalesced but merges its rows); with `duplicates`, the two passes' rows concatenated instead
    (an uncoalesced tensor with repeated rows, whose entries only count once summed). Rows 0 and 1 are in both."""
    R, d = table.numel() // table.shape[-1], table.shape[-1]
    passes = []
    for _ in range(2):
        keys = torch.cat([torch.tensor([0, 1]), torch.randint(0, R, (5,), generator=gen)])
        (gather_rows(table, keys, True) * 3 * torch.randn(7, d, generator=gen)).sum().backward()
        passes.append(table.grad)
        if duplicates:
            table.grad = None
    if not duplicates:
        return table.grad
    indices, values = torch.cat([g._indices() for g in passes], 1), torch.cat([g._values() for g in passes])
    grad = torch.sparse_coo_tensor(indices, values, table.shape)
    assert grad._nnz() > grad.coalesce()._nnz()  # some row twice
    return grad


def mixed_grads(gen: torch.Generator, duplicates: bool) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Two dense parameters and two tables ([V, d], [n_e, V, d]) with uncoalesced sparse gradients (`two_pass_grad`);
    and dense copies of all four holding the densified gradients."""
    dense = [torch.nn.Parameter(torch.randn(4, 5, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    tables = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((10, 6), (3, 10, 6))]
    for w in dense:
        w.grad = torch.randn(w.shape, generator=gen)
    for table in tables:
        table.grad = two_pass_grad(table, gen, duplicates)
        assert table.grad.is_sparse and not table.grad.is_coalesced()
    copies = [torch.nn.Parameter(t.detach().clone()) for t in dense + tables]
    for copy, t in zip(copies, dense + tables):
        copy.grad = t.grad.to_dense() if t.grad.is_sparse else t.grad.clone()
    return dense + tables, copies


@pytest.mark.parametrize("duplicates", [False, True], ids=["two_backwards", "repeated_rows"])
@pytest.mark.parametrize("max_norm", [0.5, 1e4], ids=["clips", "no_clip"])
def test_clip_grad_norm_of_mixed_dense_and_uncoalesced_sparse_grads_matches_torch_densified(max_norm, duplicates):
    params, copies = mixed_grads(torch.Generator().manual_seed(6), duplicates)
    norm = clip_grad_norm_(params, max_norm)
    want = torch.nn.utils.clip_grad_norm_(copies, max_norm)
    assert (norm > max_norm) == (max_norm == 0.5)  # the clipping case does clip
    torch.testing.assert_close(norm, want, atol=0.0, rtol=1e-6)  # float32 sums of the same squares, reordered
    for p, copy in zip(params, copies):
        got = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(got, copy.grad, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("duplicates", [False, True], ids=["two_backwards", "repeated_rows"])
def test_clip_grad_value_clamps_the_summed_rows_of_uncoalesced_sparse_grads(duplicates):
    params, copies = mixed_grads(torch.Generator().manual_seed(7), duplicates)
    clip_grad_value_(params, 1.0)
    torch.nn.utils.clip_grad_value_(copies, 1.0)
    for p, copy in zip(params, copies):
        assert torch.equal(p.grad.to_dense() if p.grad.is_sparse else p.grad, copy.grad)  # clamping is exact


@pytest.mark.parametrize("variant", ["jtok", "jtok_m"])
def test_two_backward_passes_accumulate_the_dense_gradient_sparsely(variant):
    """Through the model, two micro-batches: the sparse table gradient, densified, is the dense-mode gradient."""
    dense, sparse = tiny(variant), tiny(variant)
    sparse.use_row_sparse_grads(True)
    gen = torch.Generator().manual_seed(8)
    batches = [torch.randint(0, 97, (3, 11), generator=gen) for _ in range(2)]
    for model in (dense, sparse):
        for ids in batches:
            out = model(ids)
            (F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss).backward()
    tables = {id(t.weight) for t in sparse.token_tables()}
    assert len(tables) == 2
    # The same terms summed in another order (index_add_ of the touched rows vs indexing's dense backward).
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        if id(b) in tables:
            assert b.grad.is_sparse and not a.grad.is_sparse, name
            assert b.grad.coalesce().values().shape[0] < b.numel() // b.shape[-1], name  # only touched rows
            torch.testing.assert_close(b.grad.to_dense(), a.grad, atol=1e-6, rtol=1e-5, msg=name)
        else:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5, msg=name)


# Through the train stage (experiment=smoke, model=jtok_m: 6 steps, checkpoints at 3 and 6).
RUN = ("model=jtok_m", "probe.enabled=false")


def table_state(ckpt: dict) -> list[dict]:
    """The optimizer state of the tables' parameter group, one dict per table."""
    state = ckpt["optimizer_states"][0]
    group = next(g for g in state["param_groups"] if g.get("name") == "tables")
    return [state["state"][i] for i in group["params"]]


@pytest.mark.parametrize("kind,state_dtype", [("adam", "float32"), ("rowwise_adam", "bfloat16")])
def test_resuming_a_row_sparse_run_reproduces_the_uninterrupted_run_exactly(make_cfg, tmp_path, kind, state_dtype):
    """Single process, deterministic CPU: the resumed steps redo the same float operations from exact copies of the
    weights, optimizer state and sampler position, so losses and final weights are bit-identical."""
    opts = (f"optim.table_optimizer={kind}", f"optim.table_state_dtype={state_dtype}")
    train(make_cfg(*RUN, *opts, "checkpoint.keep_all=true", run_dir=tmp_path / "full"))
    midway = tmp_path / "full/checkpoints/step0000003.ckpt"
    train(make_cfg(*RUN, *opts, f"ckpt_path={midway}", run_dir=tmp_path / "resumed"))
    full, resumed = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert set(resumed) == {3, 4, 5} and all(resumed[s] == full[s] for s in (3, 4, 5)), (full, resumed)
    a, b = (read_checkpoint(tmp_path / run / "checkpoints/last.ckpt") for run in ("full", "resumed"))
    assert a["global_step"] == b["global_step"] == 6
    table_names = [k for k in a["state_dict"] if k.endswith("tables.weight")]
    assert len(table_names) == 2
    for name, tensor in a["state_dict"].items():
        assert torch.equal(b["state_dict"][name], tensor), name
    for ours, theirs in zip(table_state(b), table_state(a)):
        assert ours["exp_avg"].dtype == getattr(torch, state_dtype)
        assert set(ours) == set(theirs) >= set(ROW_STATE) and 0 < theirs["row_step"].max() <= 6
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), key


def test_gradient_accumulation_steps_the_tables_once_per_optimizer_step(make_cfg, tmp_path):
    cfg = make_cfg(*RUN, "optim.table_optimizer=adam", "+trainer.accumulate_grad_batches=2", "trainer.max_steps=2",
                   "trainer.val_check_interval=4")  # fmt: skip
    summary = train(cfg)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["val_loss"]))
    ckpt = read_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    for state in table_state(ckpt):  # two optimizer steps over four micro-batches: no row counts more than 2
        assert state["row_step"].max() == 2


def test_resuming_a_dense_adamw_checkpoint_with_a_row_sparse_optimizer_is_refused(make_cfg, data_cache, tmp_path):
    train(make_cfg(*RUN, "optim.table_optimizer=adamw", "trainer.max_steps=3", run_dir=tmp_path / "dense"))
    dense = tmp_path / "dense/checkpoints/last.ckpt"
    proc = run_py(offline_env(tmp_path / "cache"), "experiment=smoke", *RUN, "eval.enabled=false",
                  "optim.table_optimizer=adam", f"data.cache_dir={data_cache}", f"ckpt_path={dense}",
                  f"hydra.run.dir={tmp_path / 'sparse'}", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "optim.table_optimizer" in proc.stderr
    assert "'adamw'" in proc.stderr and "'adam'" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "sparse/checkpoints").exists()


def test_an_unknown_table_optimizer_fails_before_training_naming_the_valid_ones(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="optim.table_optimizer='bogus' is not one of adamw, adam, rowwise_adam"):
        train(make_cfg(*RUN, "optim.table_optimizer=bogus"))
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/metrics.csv").exists()


def test_a_bf16_table_s_fp32_state_and_row_counts_load_back_exactly():
    """torch casts loaded state to the parameter's dtype; through bf16 that would round exp_avg and turn a row
    count of 257 into 256. The optimizer keeps the saved tensors as they were."""
    gen = torch.Generator().manual_seed(6)
    p = torch.nn.Parameter(torch.randn(4, 8, generator=gen).to(torch.bfloat16))
    opt = table_optimizer(p, "adam", lr=1e-3)
    for _ in range(257):
        p.grad = row_sparse_grad(torch.arange(4), torch.randn(4, 8, generator=gen) * 1e-3, p)
        opt.step()
    fresh = table_optimizer(p, "adam", lr=1e-3)
    fresh.load_state_dict(round_trip(opt.state_dict()))
    assert fresh.state[p]["row_step"].tolist() == [257.0] * 4
    for key, value in opt.state[p].items():
        assert value.dtype == fresh.state[p][key].dtype and torch.equal(fresh.state[p][key], value), key


def test_fp16_loss_scaling_unscales_the_table_rows_and_skips_an_overflowing_step():
    """With a GradScaler (precision 16-mixed) the scaler must unscale the sparse rows before clipping and skip a
    step whose gradients overflowed, for the tables as for the backbone (also with fused AdamW)."""
    w = torch.nn.Parameter(torch.randn(4, 8))
    t = torch.nn.Parameter(torch.randn(10, 8))
    opt = AdamWWithRowSparseTables([{"params": [w]}, {"params": [t], "table_optimizer": "adam"}], lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ids = torch.tensor([1, 2, 2])
    scaler.scale(w.sum() + gather_rows(t, ids, sparse_grad=True).sum()).backward()
    scaler.unscale_(opt)
    torch.testing.assert_close(t.grad.to_dense()[2], torch.full((8,), 2.0))  # two slots, unscaled
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    before_w, before_t = w.detach().clone(), t.detach().clone()
    scaler.scale((w.sum() + gather_rows(t, ids, sparse_grad=True).sum()) * float("inf")).backward()
    scaler.step(opt)
    assert torch.equal(w.detach(), before_w) and torch.equal(t.detach(), before_t)


def test_step_hooks_run_once_per_step_and_see_every_group():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # torch wraps AdamW.step with its hooks once one exists
    w, t = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5, 4))
    opt = AdamWWithRowSparseTables([{"params": [w]}, {"params": [t], "table_optimizer": "adam"}], lr=1e-3)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(len(o.param_groups)))
    w.grad = torch.ones_like(w)
    opt.step()
    assert seen == [2]


def test_a_checkpoint_from_before_the_table_optimizer_setting_resumes_with_the_default(monkeypatch):
    """A checkpoint saved before `table_optimizer` / `table_state_dtype` existed was trained with dense AdamW: it
    resumes with `table_optimizer=adamw` and is refused, naming the setting, with the row-sparse default."""
    import project.pipeline as pipeline
    from project.config import ModelConfig

    cfg = ModelConfig(variant="jtok", vocab_size=64)
    optim = {"lr": 3e-3, "table_optimizer": "adamw", "table_state_dtype": "float32"}
    record = {"hyper_parameters": {"model": cfg.to_dict(), "optim": {"lr": 3e-3}}, "global_step": 4}
    monkeypatch.setattr(pipeline, "resume_record", lambda path: record)
    assert pipeline.check_resume("old.ckpt", cfg, optim, {}) == 4
    with pytest.raises(ConfigError, match="optim.table_optimizer: checkpoint 'adamw' vs config 'adam'"):
        pipeline.check_resume("old.ckpt", cfg, {**optim, "table_optimizer": "adam"}, {})
