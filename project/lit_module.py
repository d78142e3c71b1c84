"""The LightningModule shared by every variant: loss, metrics, optimizer groups and schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from project.accounting import flops_per_token, fsdp_table_bytes_per_step, param_counts
from project.config import ModelConfig, UserError
from project.model import Transformer
from project.optim import OptimConfig, build_optimizer
from project.parallel import apply_compile, apply_fsdp, compile_backend, compute_dtype, table_mode
from project.table_optim import all_gather_row_grads, clip_grad_norm_, clip_grad_value_
from project.table_parallel import shard_of, table_bytes_held


class NonFiniteLossError(UserError, RuntimeError):
    """Training produced a NaN or infinite loss (settings to change, e.g. the learning rate: not a bug)."""


class LMModule(L.LightningModule):
    """Next-token language modelling for any variant in `project.config.VARIANTS`."""

    def __init__(
        self, model: ModelConfig | Mapping[str, Any], optim: Mapping[str, Any] | None = None, parallel: dict | None = None
    ):
        super().__init__()
        self.model_cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        self.optim_cfg = OptimConfig.from_dict(optim or {})
        # Plain dicts, so checkpoints and hparams.yaml read back without this project's classes.
        self.save_hyperparameters({"model": self.model_cfg.to_dict(), "optim": dict(optim or {}), "parallel": parallel})
        self.parallel = dict(parallel or {})
        self.compile_backend = compile_backend(self.parallel.pop("compile", False))
        self.row_sharded = table_mode(self.parallel.pop("tables", "strategy"), self.optim_cfg) == "row_sharded"
        # Row-sharded tables get storage in `configure_model`, once this rank's rows are known.
        self.model = Transformer(self.model_cfg, deferred_tables=self.row_sharded)
        # Drawn here, after the backbone's initialisation, so every rank (and any world size) draws the same.
        self.table_seed = int(torch.randint(0, 2**31, ())) if self.row_sharded else None
        self.table_traffic: dict[str, Any] | None = None  # the tables' memory and bytes sent (`on_train_end`)
        self._table_bytes = self._table_steps = 0
        if self.optim_cfg.row_sparse_tables:
            self.model.use_row_sparse_grads(True)
            # DDP must not all-reduce these (it would densify them): `all_gather_row_grads` exchanges their rows.
            self._ddp_params_and_buffers_to_ignore = [
                name for name, p in self.named_parameters() if any(p is t.weight for t in self.model.token_tables())
            ]
        self.val_loss = MeanMetric()
        self.tokenizer_json: str | None = None  # travels inside checkpoints so they are self-contained
        self.data_identity: dict[str, Any] | None = None  # the data a checkpoint was trained on (checked on resume)
        self.train_tokens = 0
        self._sharded = False
        self._compiled = False

    def forward(self, ids_BT: torch.Tensor):
        return self.model(ids_BT)

    @property
    def is_sharded(self) -> bool:
        """Whether FSDP2 has sharded the model (trainer=fsdp); its MixedPrecisionPolicy then sets the compute dtype."""
        return self._sharded

    @property
    def _row_exchange(self) -> bool:
        """Whether the tables' gradient rows are exchanged after backward (row-sparse, replicated, several ranks)."""
        return self.optim_cfg.row_sparse_tables and not self.row_sharded and self.trainer.world_size > 1

    def configure_model(self) -> None:
        """Row-shard the token tables (`parallel.tables=row_sharded`), apply FSDP2 when the strategy provides a
        device mesh, then `parallel.compile` (once each: Lightning calls this again for every fit / validate)."""
        if self.row_sharded and self.model.table_exchange is None:
            self.model.shard_token_tables(shard_of(self.device_mesh, self.model_cfg.vocab_size), self.table_seed)
        if self.device_mesh is not None and not self._sharded:
            apply_fsdp(
                self.model, self.device_mesh, **self.parallel, row_sparse_tables=self.optim_cfg.row_sparse_tables
            )
            self._sharded = True
        if self.compile_backend is not None and not self._compiled:
            apply_compile(self.model, self.compile_backend)
            self._compiled = True

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
        inputs_BT, targets_BT = batch
        out = self.model(inputs_BT)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets_BT.flatten())
        return ce, out.aux_loss, targets_BT.numel()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        ce, aux, n_tokens = self._losses(batch)
        loss = ce + aux
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.global_step} "
                f"(cross-entropy {ce.item()}, aux {aux.item()}); the last good checkpoint is kept"
            )
        self.train_tokens += n_tokens * self.trainer.world_size
        # Averaged over data-parallel ranks (one scalar all-reduce), so it is the global batch's loss.
        self.log_dict({"train/loss": ce, "train/aux_loss": aux}, sync_dist=True)
        self.log("train/ppl", ce.exp(), prog_bar=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train_tokens", float(self.train_tokens))
        return loss

    def on_fit_start(self) -> None:
        if self._row_exchange:
            # DDP broadcasts rank 0's parameters when it wraps the model, but not the tables it ignores.
            for table in self.model.token_tables():
                torch.distributed.broadcast(table.weight.data, src=0)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.model.table_exchange is not None:
            self.model.table_exchange.bytes_sent = 0

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.model.table_exchange is not None:  # forward and backward of this step, not validation
            self._table_bytes += self.model.table_exchange.bytes_sent
            self._table_steps += 1

    def on_train_end(self) -> None:
        if self.model.token_tables():
            self.table_traffic = self._table_record()

    def _table_record(self) -> dict[str, Any]:
        """summary.json's `tables`: how the token tables ran, the bytes of them (and of their optimizer state) each
        rank held, the bytes each rank sent per step for them (measured; row-sharded), and what FSDP2 would send
        per step if it sharded them as parameters (analytic, this run's dtypes and world size). Max over ranks."""
        states = self.trainer.optimizers[0].state if self.trainer.optimizers else {}
        held = table_bytes_held([t.weight for t in self.model.token_tables()], states)
        measured = self.model.table_exchange is not None and self._table_steps
        sent = self._table_bytes / self._table_steps if measured else 0.0
        stats = torch.tensor([float(held), sent], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        world, device_type = self.trainer.world_size, self.device.type
        param_dtype = compute_dtype(self.parallel.get("param_dtype", "auto"), device_type) or torch.float32
        reduce_dtype = compute_dtype(self.parallel.get("reduce_dtype", "float32"), device_type) or torch.float32
        gathers = 2 if self.parallel.get("reshard_after_forward", True) else 1
        return {
            "mode": "row_sharded" if self.row_sharded else "strategy",
            "world": world,
            "held_bytes_per_rank": int(stats[0]),
            "bytes_sent_per_step": float(stats[1]) if self.row_sharded else None,
            "fsdp_bytes_per_step": fsdp_table_bytes_per_step(
                self.model_cfg, world, param_dtype.itemsize, reduce_dtype.itemsize, gathers
            ),
        }

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._row_exchange:
            all_gather_row_grads([t.weight for t in self.model.token_tables()])
        self.model.update_router_biases()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except that row-sparse table gradients count in the norm (torch's cannot)."""
        if not self.optim_cfg.row_sparse_tables or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            clip_grad_value_(params, gradient_clip_val)
        else:
            exchange = self.model.table_exchange
            clip_grad_norm_(params, gradient_clip_val, sharded_tables=exchange is not None,
                            group=exchange.shard.group if exchange is not None else None)  # fmt: skip

    def validation_step(self, batch, batch_idx: int) -> None:
        ce, _, n_tokens = self._losses(batch)
        self.val_loss.update(ce, weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # The metric is already reduced over ranks; sync_dist only silences Lightning's warning.
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)

    def configure_optimizers(self):
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if max_steps is None:
            max_steps = int(self.trainer.estimated_stepping_batches)
        opt, sched = build_optimizer(self.model, self.optim_cfg, max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokenizer_json"] = self.tokenizer_json
        checkpoint["data_identity"] = self.data_identity
        checkpoint["train_tokens"] = self.train_tokens

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The run's own tokenizer and data stay: resume has already checked that the checkpoint's are the same.
        if self.tokenizer_json is None:
            self.tokenizer_json = checkpoint.get("tokenizer_json")
        if self.data_identity is None:
            self.data_identity = checkpoint.get("data_identity")
        self.train_tokens = int(checkpoint.get("train_tokens", 0))

    def stats(self) -> dict[str, Any]:
        """Parameter counts and FLOPs per token of this model (analytic)."""
        return {"params": param_counts(self.model_cfg), "flops_per_token": flops_per_token(self.model_cfg)}


def perplexity(loss: float) -> float:
    """exp(loss), or inf when it overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")
