"""The LightningModule shared by every variant: loss, metrics, optimizer groups and schedule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from project.accounting import flops_per_token, param_counts
from project.config import ModelConfig, UserError
from project.model import Transformer
from project.optim import OptimConfig, build_optimizer
from project.parallel import apply_compile, apply_fsdp, compile_backend
from project.table_optim import all_gather_row_grads, clip_grad_norm_, clip_grad_value_


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
        self.model = Transformer(self.model_cfg)
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

    def configure_model(self) -> None:
        """Apply FSDP2 when the strategy provides a device mesh, then `parallel.compile` (once each: Lightning
        calls this again for every trainer.fit / validate)."""
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
        if self.optim_cfg.row_sparse_tables and self.trainer.world_size > 1:
            # DDP broadcasts rank 0's parameters when it wraps the model, but not the tables it ignores.
            for table in self.model.token_tables():
                torch.distributed.broadcast(table.weight.data, src=0)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.optim_cfg.row_sparse_tables and self.trainer.world_size > 1:
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
            clip_grad_norm_(params, gradient_clip_val)

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
