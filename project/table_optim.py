"""Row-sparse training of the token-indexed tables: an optimizer that updates only the rows a step touched
(lazy Adam, row-wise Adam), gradient clipping that counts those rows, and their exchange between ranks.

A table's gradient is a sparse COO tensor holding the touched rows (`kernels.reference.row_sparse_grad`), so
no step allocates, clips, reduces or updates a `[V, d]` buffer. How each optimizer differs from dense AdamW is
in the README (Row-sparse tables).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TABLE_OPTIMIZERS = ("adamw", "adam", "rowwise_adam")  # adamw: dense gradients and torch's AdamW, as the backbone
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def touched_rows(grad: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_U, grad_UD) of a table gradient: the touched rows of the table flattened to `[-1, d]` and their
    summed gradients. A dense gradient (e.g. the zero gradients distributed checkpointing steps with) touches all rows."""
    if not grad.is_sparse:
        grad_RD = grad.reshape(-1, d)
        return torch.arange(grad_RD.shape[0], device=grad.device), grad_RD
    grad = grad.coalesce()
    indices = grad.indices()
    rows_U = indices[0]
    for dim in range(1, grad.sparse_dim()):  # row-major position of (table, id) in the flattened table
        rows_U = rows_U * grad.shape[dim] + indices[dim]
    return rows_U, grad.values().reshape(-1, d)


class AdamWWithRowSparseTables(torch.optim.AdamW):
    """torch's AdamW for every group but the token tables (groups with a `table_optimizer` key), which get lazy
    Adam (`adam`) or row-wise Adam (`rowwise_adam`) on the rows their sparse gradient touched.

    Per table, the state is `exp_avg` `[R, d]`, `exp_avg_sq` `[R, d]` (adam) or `[R]` (rowwise_adam: the mean of
    the squared gradient over the row), both in the group's `state_dtype`, and `row_step` `[R]` (float32: exact to
    2^24 updates), the number of updates of each row, which its bias correction uses. R = the table's rows.
    `step` counts the steps that updated the table (torch's Adam expects every state to have one)."""

    def __init__(self, params, **adamw_kwargs):
        super().__init__(params, **adamw_kwargs)
        for group in self.param_groups:
            if group.get("table_optimizer") is not None:
                if group["table_optimizer"] not in TABLE_OPTIMIZERS[1:]:
                    raise ValueError(f"table_optimizer {group['table_optimizer']!r} is not one of {TABLE_OPTIMIZERS[1:]}")
                if group.get("state_dtype", "float32") not in STATE_DTYPES:
                    raise ValueError(f"state_dtype {group['state_dtype']!r} is not one of {', '.join(STATE_DTYPES)}")
        # Under fp16 AMP the GradScaler must unscale the tables' gradients (and skip overflowing steps) for us.
        self._step_supports_amp_scaling = False

    def _table_states(self, state_dict: dict):
        """(param, key) of every table in `state_dict` that has state there."""
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            if group.get("table_optimizer") is not None:
                for p, key in zip(group["params"], saved_group["params"]):
                    if key in state_dict["state"]:
                        yield p, key

    def state_dict(self) -> dict:
        """torch's; a row-sharded table's per-row state (`[rows, ...]`, its flattened rows first) is saved as its
        rows of the global state, like the table itself (`project.table_parallel.ShardedRows`)."""
        state_dict = super().state_dict()
        for p, key in list(self._table_states(state_dict)):
            spec = getattr(p, "sharded_rows", None)
            if spec is not None:  # a new dict: the saved one is the live state
                state_dict["state"][key] = {
                    k: spec.to_checkpoint(v, flattened=True) if torch.is_tensor(v) and v.dim() else v
                    for k, v in state_dict["state"][key].items()
                }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, except that the tables' state comes back exactly as saved: torch casts floating state to the
        parameter's dtype (bf16 state of an fp32 table, fp32 state of a bf16 table, the float row counts).
        A row-sharded table takes its own rows of the saved state."""
        super().load_state_dict(state_dict)
        for p, key in self._table_states(state_dict):
            spec, state = getattr(p, "sharded_rows", None), {}
            for k, v in state_dict["state"][key].items():
                if spec is not None and hasattr(v, "to_local"):  # this rank's rows of a row-sharded table's state
                    v = spec.local_state(v)
                state[k] = v.to(p.device) if torch.is_tensor(v) else v
            self.state[p] = state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if g.get("table_optimizer") is None]
        try:  # AdamW's own step on the dense groups, without running the step hooks a second time
            dense_step = torch.optim.AdamW.step
            (dense_step.__wrapped__ if getattr(dense_step, "hooked", False) else dense_step)(self)
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("table_optimizer") is not None:
                for p in group["params"]:
                    if p.grad is not None:
                        self._table_step(p, group)
        return loss

    def _table_step(self, p: torch.Tensor, group: dict) -> None:
        """One lazy update of the rows of `p` that its gradient touched; other rows and their state stay as they are."""
        d = p.shape[-1]
        rows_U, grad_UD = touched_rows(p.grad, d)
        if rows_U.numel() == 0:
            return
        rowwise = group["table_optimizer"] == "rowwise_adam"
        state = self.state[p]
        if not state:
            n_rows, dtype = p.numel() // d, STATE_DTYPES[group.get("state_dtype", "float32")]
            state["exp_avg"] = torch.zeros(n_rows, d, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros((n_rows,) if rowwise else (n_rows, d), dtype=dtype, device=p.device)
            state["row_step"] = torch.zeros(n_rows, dtype=torch.float32, device=p.device)
            state["step"] = torch.zeros((), dtype=torch.float32)
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        p_RD = p.view(-1, d)
        # index_select / index_copy_ and in-place ops: the update makes a few passes over the [U, d] touched rows.
        step_U = state["row_step"].index_select(0, rows_U).add_(1)
        step_size_U1 = (lr / (1 - beta1**step_U))[:, None]
        inv_bias_correction2_sqrt_U1 = (1 - beta2**step_U).rsqrt()[:, None]
        g_UD = grad_UD.float()
        exp_avg_UD = state["exp_avg"].index_select(0, rows_U).float().lerp_(g_UD, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows_U).float().mul_(beta2)
        if rowwise:  # [U]: the row's mean squared gradient
            exp_avg_sq.add_(g_UD.square().mean(-1), alpha=1 - beta2)
            denom = exp_avg_sq.sqrt()[:, None]
        else:  # [U, d]
            exp_avg_sq.addcmul_(g_UD, g_UD, value=1 - beta2)
            denom = exp_avg_sq.sqrt()
        denom = denom.mul_(inv_bias_correction2_sqrt_U1).add_(eps).div_(step_size_U1)
        param_UD = p_RD.index_select(0, rows_U).float()
        if weight_decay:
            param_UD.mul_(1 - lr * weight_decay)
        param_UD.addcdiv_(exp_avg_UD, denom, value=-1)
        p_RD.index_copy_(0, rows_U, param_UD.to(p.dtype))
        state["exp_avg"].index_copy_(0, rows_U, exp_avg_UD.to(state["exp_avg"].dtype))
        state["exp_avg_sq"].index_copy_(0, rows_U, exp_avg_sq.to(state["exp_avg_sq"].dtype))
        state["row_step"].index_copy_(0, rows_U, step_U)
        state["step"] += 1


def _dense_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor over the shards


def clip_grad_norm_(parameters, max_norm: float, sharded_tables: bool = False, group=None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a mix of dense (or FSDP2-sharded) and row-sparse gradients: the
    global 2-norm counts every touched row once. Sparse gradients are the same on every rank (after
    `all_gather_row_grads`), so their share of the norm is not reduced again; with `sharded_tables` each rank of
    `group` holds other rows (row-sharded tables), and their shares are summed over it. Returns the norm before
    clipping."""
    params = [p for p in parameters if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    dense = [p.grad for p in params if not p.grad.is_sparse]
    device = (sparse or params)[0].grad.device if params else None  # offloaded dense grads may be elsewhere
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    if dense:
        total_sq = total_sq + _dense_norm(dense).float().square().to(device)
    sparse_sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in sparse:
        sparse_sq = sparse_sq + p.grad.values().float().square().sum()
    if sharded_tables and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sparse_sq, group=group)
    total = (total_sq + sparse_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense:
        (g.to_local() if hasattr(g, "to_local") else g).mul_(coef.to(g.device, g.dtype))
    for p in sparse:
        p.grad.values().mul_(coef.to(p.grad.dtype))
    return total


def clip_grad_value_(parameters, clip_value: float) -> None:
    """Clamp every gradient entry, dense or row-sparse, to `[-clip_value, clip_value]`."""
    for p in parameters:
        if p.grad is not None:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
            (p.grad.values() if p.grad.is_sparse else p.grad).clamp_(-clip_value, clip_value)


def all_gather_row_grads(tables: list[torch.Tensor], group=None) -> None:
    """Make every table's sparse gradient the mean over data-parallel ranks, as DDP does for dense ones, by
    exchanging only the touched rows: one all-gather of row counts, then one of all tables' (row key, values),
    padded to the largest count. Every rank then holds the same gradient and applies the same update."""
    world = dist.get_world_size(group)
    tables = [p for p in tables if p.requires_grad]
    if world == 1 or not tables:
        return
    d = tables[0].shape[-1]
    device = tables[0].device
    keys, values, offset = [], [], 0
    for p in tables:
        if p.grad is not None:
            rows_U, grad_UD = touched_rows(p.grad, d)
            keys.append(rows_U + offset)
            values.append(grad_UD.float())
        offset += p.numel() // d
    keys_U = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64, device=device)
    values_UD = torch.cat(values) if values else torch.zeros(0, d, device=device)
    count = torch.tensor([keys_U.numel()], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    longest = int(max(c.item() for c in counts))
    padded_keys = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded_keys[: keys_U.numel()] = keys_U
    padded_values = torch.zeros(longest, d, device=device)
    padded_values[: keys_U.numel()] = values_UD
    all_keys = [torch.empty_like(padded_keys) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_keys, padded_keys, group=group)
    dist.all_gather(all_values, padded_values, group=group)
    unique_K, inverse_S = torch.unique(torch.cat(all_keys), return_inverse=True)
    if unique_K.numel() and unique_K[0] < 0:  # the padding key
        unique_K, inverse_S = unique_K[1:], inverse_S - 1
    # Summed rank by rank, in rank order: a rank's keys are unique, so no add races (CUDA's index_add_ is
    # atomic) and every rank computes bit-identical rows.
    summed_KD = torch.zeros(unique_K.numel() + 1, d, device=device)  # row -1 + 1 = 0 takes the padding
    for inverse_L, values_LD in zip(inverse_S.split(longest), all_values):
        summed_KD.index_add_(0, inverse_L + 1, values_LD)
    summed_KD = summed_KD[1:] / world
    from kernels.reference import sparse_rows

    offset = 0
    for p in tables:
        n_rows = p.numel() // d
        mine = (unique_K >= offset) & (unique_K < offset + n_rows)
        p.grad = sparse_rows(unique_K[mine] - offset, summed_KD[mine].to(p.dtype), p.shape)
        offset += n_rows
