"""Training throughput, timed in one place: tokens/s and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from project.accounting import matmul_precision, model_flops_utilisation, peak_flops
from project.config import ConfigError
from project.parallel import compute_dtype

log = logging.getLogger(__name__)


class Throughput(Callback):
    """Training throughput, timed here and nowhere else: the wall time of each training batch (forward, backward and
    optimizer step; data loading, validation and checkpointing excluded). Logs `train/tokens_per_sec` (global tokens
    over the last `log_every_n_steps` batches) and, when the peak FLOP/s of the devices is known, `train/mfu`; its
    totals give summary.json's `tokens_per_sec`, `train_seconds` and `mfu`. Also records the step of the latest
    validation."""

    def __init__(self, flops_per_token: int, peak_flops: float | None = None) -> None:
        self.flops_per_token = flops_per_token
        self.configured_peak = peak_flops
        self.peak_per_device: float | None = peak_flops
        self.devices = 1
        self.seconds = 0.0
        self.tokens = 0
        self.validated_at: int | None = None
        self._start = 0.0
        self._window: deque[tuple[int, float]] = deque()

    @property
    def tokens_per_sec(self) -> float | None:
        """Global training tokens per second over the whole run so far."""
        return self.tokens / self.seconds if self.seconds else None

    def mfu(self, tokens_per_sec: float | None) -> float | None:
        """Model FLOPs utilisation at `tokens_per_sec`, or None without a known peak."""
        if tokens_per_sec is None or self.peak_per_device is None:
            return None
        return model_flops_utilisation(tokens_per_sec, self.flops_per_token, self.peak_per_device, self.devices)

    def on_train_start(self, trainer, pl_module) -> None:
        self.devices = trainer.world_size
        self.peak_per_device = self.configured_peak or device_peak_flops(trainer, pl_module)
        self._window = deque(maxlen=max(1, trainer.log_every_n_steps))
        if self.peak_per_device is None and trainer.is_global_zero:
            log.info("train/mfu is not logged: no known peak FLOP/s for %s at %s; set mfu.peak_flops to log it",
                     device_name(pl_module.device), trainer.precision)  # fmt: skip

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validated_at = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # kernels run asynchronously: wait for this batch's to finish
        seconds = time.perf_counter() - self._start
        tokens = batch[0].numel() * trainer.world_size
        self.seconds += seconds
        self.tokens += tokens
        self._window.append((tokens, seconds))
        rate = sum(t for t, _ in self._window) / max(sum(s for _, s in self._window), 1e-9)
        pl_module.log("train/tokens_per_sec", rate, prog_bar=True)
        mfu = self.mfu(rate)
        if mfu is not None:
            pl_module.log("train/mfu", mfu)


def device_name(device: torch.device) -> str:
    """A device as people know it: the CUDA product name, else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def device_peak_flops(trainer: L.Trainer, module: L.LightningModule) -> float | None:
    """The dense peak FLOP/s of one of the run's devices at the precision its matmuls run in (accounting.PEAK_FLOPS),
    or None: CPUs and devices not in the table have none."""
    if module.device.type != "cuda":
        return None
    setting = trainer.precision
    if module.is_sharded:  # FSDP2's MixedPrecisionPolicy decides the compute dtype, not Lightning's precision
        dtype = compute_dtype(module.parallel.get("param_dtype", "auto"), module.device.type)
        setting = {torch.bfloat16: "bf16-true", torch.float16: "16-true"}.get(dtype, setting)
    return peak_flops(device_name(module.device), matmul_precision(setting, torch.get_float32_matmul_precision()))


def check_peak_flops(value: Any) -> float | None:
    """`mfu.peak_flops`: None, or a positive number of FLOP/s."""
    if value is None:
        return None
    try:
        peak = float(value)
    except (TypeError, ValueError):
        peak = math.nan
    if not (peak > 0 and math.isfinite(peak)):
        raise ConfigError(f"mfu.peak_flops={value!r} must be the peak FLOP/s of one device (e.g. 989e12), or null")
    return peak
