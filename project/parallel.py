"""Data parallelism for the decoder (FSDP2 wrapping, used by `trainer=fsdp`), the token tables' mode
(`parallel.tables`; row-sharded tables in project/table_parallel.py) and `torch.compile` of its blocks
(`parallel.compile`). Kept apart from the model definition, as in torchtitan; sharded checkpoints are
consolidated in `project/checkpoint.py`."""

from __future__ import annotations

from typing import Any

import torch

from project.config import ConfigError
from project.model import Transformer
from project.optim import OptimConfig
from project.table_parallel import TABLE_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str | None, device_type: str) -> torch.dtype | None:
    """The dtype a `parallel.*_dtype` setting names on this device type (None: keep the parameters' own)."""
    if name in (None, "auto"):
        return torch.bfloat16 if device_type == "cuda" and name == "auto" else None
    if name not in DTYPES:
        raise ValueError(f"parallel dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def apply_fsdp(
    model: Transformer,
    device_mesh,
    reshard_after_forward: bool = True,
    param_dtype: str | None = "auto",
    reduce_dtype: str | None = "float32",
    cpu_offload: bool = False,
    row_sparse_tables: bool = False,
) -> Transformer:
    """Shard `model` in place with FSDP2 over the mesh's data-parallel dimension.

    Units, innermost first:
    - each layer's token-indexed modulator (JTok / JTok-M: its tables plus scale and router). The
      tables are the bulk of the parameters but each step touches few rows, so they get their own
      all-gather / reduce-scatter, which can be offloaded or resharded independently of the block;
      the lookup runs inside the modulator's forward, so FSDP's hooks gather the tables around it;
    - each transformer block (attention, FFN or MoE experts, norms);
    - untied: the token embedding, and the final norm with the output head. Tied: both stay in
      the root unit, since FSDP2 cannot split one parameter across two units;
    - the root module (everything left).
    `param_dtype="auto"` computes in bf16 on GPU and fp32 on CPU; gradients reduce in `reduce_dtype`.
    With `row_sparse_tables`, the token tables stay out of FSDP (whole on every rank, in fp32): their sparse
    gradients are exchanged row by row (`project.table_optim.all_gather_row_grads`), never reduce-scattered.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = device_mesh["data_parallel"] if device_mesh.mesh_dim_names else device_mesh
    device_type = mesh.device_type
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype(param_dtype, device_type), reduce_dtype=compute_dtype(reduce_dtype, device_type))
    tables = {t.weight for t in model.token_tables()} if row_sparse_tables else set()
    if tables and device_type == "cuda":  # FSDP moves the parameters it manages to the device, not these
        for table in model.token_tables():
            table.weight.data = table.weight.data.to(torch.device("cuda", torch.cuda.current_device()))
    common: dict[str, Any] = dict(
        mesh=mesh, mp_policy=policy, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
        ignored_params=tables or None,
    )
    for block in model.layers:
        for modulator in (block.jtok, block.jtok_m):
            if modulator is not None:
                fully_shard(modulator, reshard_after_forward=reshard_after_forward, **common)
        fully_shard(block, reshard_after_forward=reshard_after_forward, **common)
    if not model.cfg.tie_embeddings:
        fully_shard(model.tok_emb, reshard_after_forward=reshard_after_forward, **common)
        # The head runs last in forward and first in backward: keeping it gathered saves one all-gather.
        fully_shard([model.norm, model.lm_head], reshard_after_forward=False, **common)
    fully_shard(model, reshard_after_forward=False, **common)
    return model


def table_mode(setting: str | None, optim: OptimConfig) -> str:
    """The `parallel.tables` mode, or a clear error: row-sharded tables train on row-sparse gradients only."""
    mode = setting or "strategy"
    if mode not in TABLE_MODES:
        raise ConfigError(f"parallel.tables={setting!r} is not one of {', '.join(TABLE_MODES)}")
    if mode == "row_sharded" and not optim.row_sparse_tables:
        raise ConfigError(
            "parallel.tables=row_sharded updates each rank's rows with a row-sparse optimizer: set "
            "optim.table_optimizer=adam or rowwise_adam (not adamw)"
        )
    return mode


def check_table_strategy(mode: str, trainer: Any) -> None:
    """Refuse row-sharded tables on several devices under anything but FSDP2 (`trainer=fsdp`): DDP (also what
    `strategy=auto` picks for several devices) writes rank 0's state only, which would lose the other ranks' rows."""
    strategy = trainer.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else str((strategy or {}).get("_target_", ""))
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    one_device = devices in (1, "1", [0]) or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    if mode == "row_sharded" and "ModelParallelStrategy" not in name and not (one_device and nodes in (1, None)):
        raise ConfigError(
            "parallel.tables=row_sharded runs on one device (trainer.devices=1) or under trainer=fsdp (FSDP2: "
            f"sharded checkpoints keep each rank's rows); trainer.strategy={name} on trainer.devices={devices} "
            "would save rank 0's rows only"
        )


def compile_backend(setting: bool | str | None) -> str | None:
    """The `torch.compile` backend a `parallel.compile` setting names (false / null: None, true: inductor),
    or a clear error when it cannot run here."""
    if setting in (None, False):
        return None
    backend = "inductor" if setting is True else setting
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(backend, str) or backend not in known:
        raise ConfigError(
            f"parallel.compile={setting!r} must be true, false or a torch.compile backend: {', '.join(known)}"
        )
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            "parallel.compile: torch.compile does not support this Python version or platform; set it to false"
        )
    return backend


def apply_compile(model: Transformer, backend: str) -> Transformer:
    """Compile each transformer block in place (`nn.Module.compile`), before or after FSDP2 wrapping alike.

    Per block, as torchtitan does: the blocks share one code object, so one compilation serves every
    layer, and a graph stays the size of one block whatever the depth. In place, so parameter names,
    state dicts and checkpoints are those of the eager model (a resumed run may switch compile on or
    off), and the order against `apply_fsdp` does not matter (the module objects FSDP2 wraps are the
    ones compiled). Under FSDP2 a JTok / JTok-M block compiles to several graphs, not one: its
    modulator is an FSDP unit of its own, and dynamo skips FSDP2's hooks, so the graph breaks around
    the modulator's call. The embedding, the head and the loss stay eager. The kernel ops run as the
    opaque custom ops of `kernels.library`; a row-sparse table gradient (`optim.table_optimizer=adam|
    rowwise_adam`) is one more graph break per JTok layer (`kernels/__init__.py`)."""
    for block in model.layers:
        block.compile(backend=backend)
    return model
