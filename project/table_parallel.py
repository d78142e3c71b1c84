"""Row-sharded token tables (`parallel.tables=row_sharded`): each data-parallel rank owns a fixed slice of the
vocabulary's rows in every token-indexed table, and only ids, routing weights and d-vectors cross between ranks.

One training step, as docs/METHOD.md's embedding parallelism describes it:
- once per forward, from the token ids alone (`TableExchange.route`): each rank sends its ids to their owners,
  de-duplicated for JTok, one per token for JTok-M;
- JTok (`fetch_rows`): the owners gather every JTok layer's rows for those ids and send them back in one
  exchange; in backward the rows' gradients go back to the owners in one exchange;
- JTok-M (`premix`), per layer: each token's K table choices and weights go to the owner of its id, which mixes
  its K rows and returns one d-vector `e = sum_k w_k E_k[x]`; backward sends `de` and gets back `dw`.
An owner sums what every rank sends back for a row and divides by the world size (data parallelism averages
gradients), so its tables get the row-sparse gradient a single process would compute for the global batch, and
the row-sparse table optimizer (`project.table_optim`) updates its own rows only. No rank ever holds a whole table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kernels.reference import expert_counts, row_sparse_grad, stand_in
from project.config import ConfigError

TABLE_MODES = ("strategy", "row_sharded")  # strategy: the tables are parameters like any other (FSDP2 units, DDP)
INIT_CHUNK_ROWS = 1024  # rows drawn from one seed: a table's initial values do not depend on how it is split


@dataclass(frozen=True)
class RowShard:
    """The vocabulary rows `[start, stop)` that rank `rank` of `world` owns in every table: `torch.chunk`'s split,
    as DTensor's `Shard` placement cuts it, so sharded checkpoints describe the same slices."""

    vocab: int
    rank: int = 0
    world: int = 1
    group: Any = None  # the data-parallel process group (None: the default group)
    mesh: Any = None  # its DeviceMesh: checkpoints then save the rows as DTensors (None: a plain tensor, world 1)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in a world of {self.world}")
        if (self.world - 1) * self.rows_per_rank >= self.vocab:
            raise ConfigError(
                f"parallel.tables=row_sharded: a vocabulary of {self.vocab} rows cannot give each of {self.world} "
                f"ranks rows of its own (ceil(V / ranks) = {self.rows_per_rank} rows each); use fewer ranks"
            )

    @property
    def rows_per_rank(self) -> int:
        return -(-self.vocab // self.world)

    @property
    def start(self) -> int:
        return self.rank * self.rows_per_rank

    @property
    def stop(self) -> int:
        return min(self.vocab, self.start + self.rows_per_rank)

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        """The rank that owns each id's rows."""
        return torch.div(ids, self.rows_per_rank, rounding_mode="floor")


def init_rows(shape: tuple[int, ...], shard: RowShard, std: float, seed: int) -> torch.Tensor:
    """This rank's rows of a table of global `shape` (`[V, d]` or `[n, V, d]`), drawn from N(0, std) in chunks of
    `INIT_CHUNK_ROWS` rows, each chunk from its own seed: the values of a row depend on `seed` only, not on the
    world size, so runs on 1 and on 2 ranks start from the same tables (and no rank draws a whole table). Drawn on
    the CPU in float32, whatever the default device and dtype: CUDA's generator would give other values."""
    *lead, vocab, d = shape
    out = torch.empty(*lead, shard.rows, d, device="cpu", dtype=torch.float32)
    first, last = shard.start // INIT_CHUNK_ROWS, (shard.stop - 1) // INIT_CHUNK_ROWS
    for table in range(math.prod(lead)):
        out_VD = out.view(-1, shard.rows, d)[table]
        for chunk in range(first, last + 1):
            lo, hi = chunk * INIT_CHUNK_ROWS, min(vocab, (chunk + 1) * INIT_CHUNK_ROWS)
            chunk_seed = ((seed * 1_000_003 + table) * 65_537 + chunk) % 2**63
            generator = torch.Generator(device="cpu").manual_seed(chunk_seed)
            values = torch.randn(hi - lo, d, generator=generator, device="cpu", dtype=torch.float32).mul_(std)
            a, b = max(lo, shard.start), min(hi, shard.stop)
            out_VD[a - shard.start : b - shard.start] = values[a - lo : b - lo]
    return out


class TableExchange:
    """The communication of one model's row-sharded tables; counts the bytes this rank sends to other ranks."""

    def __init__(self, shard: RowShard):
        self.shard = shard
        self.bytes_sent = 0

    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows `x` cut into `send[r]` rows for rank r; returns the rows received, `recv[r]` from rank r."""
        if self.shard.world == 1:
            return x
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.shard.group)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self.bytes_sent += (sum(send) - send[self.shard.rank]) * row_bytes
        return out

    def route(self, ids_N: torch.Tensor, per_token: bool) -> Route:
        """Send this step's ids to their owners (once per forward; every layer reuses the route)."""
        return Route(self, ids_N, per_token)


class Route:
    """Where one batch's ids went. Requester side: the keys in owner order (`unique ids` or each token's id) and how
    to put replies back (`inverse_N` or `order_N`); owner side: `rows_R`, its own rows that other ranks asked for."""

    def __init__(self, exchange: TableExchange, ids_N: torch.Tensor, per_token: bool):
        shard = self.shard = exchange.shard
        self.exchange = exchange
        ids_N = ids_N.to(torch.int64)
        if per_token:  # JTok-M: each token to the owner of its id, which mixes that token's own K rows
            owner_N = shard.owner(ids_N)
            self.order_N = torch.argsort(owner_N, stable=True)
            keys = ids_N[self.order_N]
        else:  # JTok: each distinct id once; torch.unique sorts, so the keys are grouped by owner
            keys, self.inverse_N = torch.unique(ids_N, return_inverse=True)
        send_W = expert_counts(shard.owner(keys), shard.world)  # keys per owner
        recv_W = exchange.all_to_all(send_W, [1] * shard.world, [1] * shard.world)
        # all_to_all takes its split sizes as Python ints: the one host synchronisation of the route.
        self.send, self.recv = send_W.tolist(), recv_W.tolist()
        self.rows_R = exchange.all_to_all(keys, self.send, self.recv) - shard.start

    def to_owners(self, x: torch.Tensor) -> torch.Tensor:
        return self.exchange.all_to_all(x, self.send, self.recv)

    def to_requesters(self, x: torch.Tensor) -> torch.Tensor:
        return self.exchange.all_to_all(x, self.recv, self.send)

    def unsort(self, x_sorted: torch.Tensor) -> torch.Tensor:
        """Per-token replies in owner order back to token order (per_token routes)."""
        return torch.empty_like(x_sorted).index_copy_(0, self.order_N, x_sorted)


def table_bytes_held(tables: list[torch.Tensor], optimizer_state) -> int:
    """Bytes this rank holds of the tables and of their optimizer state (a DTensor's local shard only)."""
    held = 0
    for table in tables:
        for t in [table, *optimizer_state.get(table, {}).values()]:
            if torch.is_tensor(t):
                local = t.to_local() if hasattr(t, "to_local") else t
                held += local.numel() * local.element_size()
    return held


class Uncast:
    """Fetched rows handed to an FSDP2 unit as they are: FSDP2 casts the floating tensors among a unit's arguments
    to its compute dtype (bf16), and the rows must stay in the tables' dtype, as a table read inside the unit does."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _FetchRows(torch.autograd.Function):
    """Every JTok layer's rows for this rank's unique ids, `[U, L, d]`, from their owners; backward returns the
    rows' gradients to the owners as row-sparse gradients of their shards."""

    @staticmethod
    def forward(ctx, route: Route, *shards_VD: torch.Tensor) -> torch.Tensor:
        ctx.route, ctx.tables = route, [stand_in(s) for s in shards_VD]
        rows_RLD = torch.stack([s.index_select(0, route.rows_R) for s in shards_VD], dim=1)
        return route.to_requesters(rows_RLD)

    @staticmethod
    def backward(ctx, grad_ULD: torch.Tensor):
        route = ctx.route
        grad_RLD = route.to_owners(grad_ULD.float()) / route.shard.world
        grads = [row_sparse_grad(route.rows_R, grad_RLD[:, layer], table) for layer, table in enumerate(ctx.tables)]
        return (None, *grads)


class _Premix(torch.autograd.Function):
    """`e = sum_k w_k E_k[x]` for every token, mixed by the owner of its id; backward returns `dw` to the tokens'
    ranks and a row-sparse gradient of the owner's `[n_e, rows, d]` shard."""

    @staticmethod
    def forward(ctx, route: Route, shard_EVD: torch.Tensor, topk_idx_NK: torch.Tensor, topk_w_NK: torch.Tensor):
        K = topk_idx_NK.shape[1]
        # One message per token: the K table indices (exact in float32) and the K weights.
        packed_NP = torch.cat([topk_idx_NK.to(torch.float32), topk_w_NK.float()], dim=1)[route.order_N]
        packed_SP = route.to_owners(packed_NP)
        idx_SK, w_SK = packed_SP[:, :K].to(torch.int64), packed_SP[:, K:]
        rows_SKD = shard_EVD[idx_SK, route.rows_R[:, None]].float()
        e_SD = torch.einsum("sk,skd->sd", w_SK, rows_SKD)
        ctx.save_for_backward(shard_EVD, idx_SK, w_SK)
        ctx.route, ctx.w_dtype = route, topk_w_NK.dtype
        return route.unsort(route.to_requesters(e_SD))

    @staticmethod
    def backward(ctx, grad_e_ND: torch.Tensor):
        shard_EVD, idx_SK, w_SK = ctx.saved_tensors
        route = ctx.route
        grad_e_SD = route.to_owners(grad_e_ND.float()[route.order_N])
        rows_R = route.rows_R[:, None]
        grad_w_SK = torch.einsum("skd,sd->sk", shard_EVD[idx_SK, rows_R].float(), grad_e_SD)
        grad_w_NK = route.unsort(route.to_requesters(grad_w_SK)).to(ctx.w_dtype)
        keys_SK = idx_SK * shard_EVD.shape[1] + rows_R
        values_SKD = w_SK[..., None] * grad_e_SD[:, None, :] / route.shard.world
        grad_table = row_sparse_grad(keys_SK, values_SKD, stand_in(shard_EVD)) if ctx.needs_input_grad[1] else None
        return None, grad_table, None, grad_w_NK


@torch.compiler.disable  # collectives with data-dependent sizes: always eager, also inside a compiled block
def fetch_rows(route: Route, shards_VD: list[torch.Tensor]) -> torch.Tensor:
    """`[U, L, d]`: layer l's row of each unique id of the route (`route.inverse_N` indexes them per token)."""
    return _FetchRows.apply(route, *shards_VD)


@torch.compiler.disable
def premix(route: Route, shard_EVD: torch.Tensor, topk_idx_NK: torch.Tensor, topk_w_NK: torch.Tensor) -> torch.Tensor:
    """`[N, d]`: each token's JTok-M mixture `e`, computed by the owner of its id."""
    return _Premix.apply(route, shard_EVD, topk_idx_NK, topk_w_NK)


def shard_of(device_mesh, vocab: int) -> RowShard:
    """This rank's `RowShard` over the data-parallel dimension of Lightning's device mesh (None: one process)."""
    if device_mesh is None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "parallel.tables=row_sharded runs on one device or under trainer=fsdp (FSDP2, whose sharded "
                "checkpoints keep each rank's rows); DDP would save rank 0's rows only"
            )
        return RowShard(vocab)
    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    return RowShard(vocab, rank=mesh.get_local_rank(), world=mesh.size(), group=mesh.get_group(), mesh=mesh)


@dataclass(frozen=True)
class ShardedRows:
    """How a row-sharded table (or a per-row state of it) is saved: this rank's rows of the global `[*lead, V, ...]`
    tensor, as a DTensor sharded on the row dimension, which distributed checkpoints save rank by rank (a plain
    tensor would be taken for a replica, and one rank's rows saved for all)."""

    shard: RowShard
    lead: tuple[int, ...]  # () for JTok's [V, d], (n_e,) for JTok-M's [n_e, V, d]

    def to_checkpoint(self, local: torch.Tensor, flattened: bool = False) -> torch.Tensor:
        """`local`: `[*lead, rows, ...]` (the table), or with `flattened` `[prod(lead) * rows, ...]` (the optimizer's
        per-row state)."""
        if self.shard.mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Shard

        rest = local.shape[1:] if flattened else local.shape[len(self.lead) + 1 :]
        local = local.reshape(*self.lead, self.shard.rows, *rest)
        shape = torch.Size((*self.lead, self.shard.vocab, *rest))
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return DTensor.from_local(local, self.shard.mesh, [Shard(len(self.lead))], run_check=False, shape=shape,
                                  stride=stride)  # fmt: skip

    def local_state(self, saved) -> torch.Tensor:
        """An optimizer state saved by `to_checkpoint` (a DTensor), as the optimizer holds it: `[prod(lead) * rows, ...]`."""
        local = saved.to_local()
        if local.shape[len(self.lead)] != self.shard.rows:
            raise ConfigError(f"optimizer state {tuple(local.shape)} does not hold this rank's {self.shard.rows} rows")
        return local.reshape(-1, *local.shape[len(self.lead) + 1 :])

    def from_checkpoint(self, saved: torch.Tensor, local_shape: torch.Size, name: str) -> torch.Tensor:
        """This rank's rows of a saved value, shaped like `local_shape`: a DTensor's local rows, a tensor of this
        rank's rows, or a whole table (a consolidated checkpoint), cut to this rank's rows."""
        if hasattr(saved, "to_local"):
            saved = saved.to_local()
        dim = len(self.lead)
        if saved.numel() == math.prod(local_shape):
            return saved.reshape(local_shape)
        if saved.dim() > dim and saved.shape[dim] == self.shard.vocab:
            return saved.narrow(dim, self.shard.start, self.shard.rows).reshape(local_shape)
        raise ConfigError(
            f"{name}: the checkpoint holds {tuple(saved.shape)}, neither this rank's {self.shard.rows} rows of the "
            f"{self.shard.vocab}-row table ({tuple(local_shape)}) nor the whole table"
        )


def save_rows_hook(module, state_dict, prefix, local_metadata) -> None:
    """`TokenTable` state-dict hook: a row-sharded table is saved as a DTensor of the global table."""
    spec = getattr(module.weight, "sharded_rows", None)
    if spec is not None and prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = spec.to_checkpoint(state_dict[prefix + "weight"])


def load_rows_hook(module, state_dict, prefix, *args) -> None:
    """`TokenTable` load hook: a row-sharded table keeps its own rows of what it is given (`from_checkpoint`)."""
    spec, key = getattr(module.weight, "sharded_rows", None), prefix + "weight"
    if spec is not None and key in state_dict:
        state_dict[key] = spec.from_checkpoint(state_dict[key], module.weight.shape, key)
