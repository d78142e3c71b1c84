"""Tile configurations of the MoE grouped GEMMs: the autotune lists, their pruning, and a way to force one.

Every GEMM kernel of `moe_experts` takes the same meta-parameters BLOCK_M (rows of a tile), BLOCK_N
(columns), BLOCK_K (reduction chunk) and GROUP_M (row tiles per L2 group). Compiled (GPU, or a
compile check under a stub driver) they are autotuned over `MMA_CONFIGS` (bf16/fp16, tensor cores)
or `IEEE_CONFIGS` (fp32, exact fp32 dots on CUDA cores), pruned per kernel to what fits in
registers and shared memory. Interpreted (`TRITON_INTERPRET=1` when triton was imported) the
single `INTERPRETER_CONFIG` keeps the CPU tests fast; `forced_config` runs any other.

Reproducibility: for a fixed config every output element is one program's fixed-order loop, so
results are bit-for-bit reproducible. Another config sums in another order (BLOCK_K, and tl.dot's
own order per tile shape), so the tuners cache their choice on disk (`cache_results=True`, in
Triton's cache directory) and a machine keeps it across runs; two machines may differ in the last bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import triton

# Triton decides when a kernel is decorated (at import) whether it is compiled or interpreted.
INTERPRETED = bool(triton.knobs.runtime.interpret)
SMEM_BUDGET = 160 * 1024  # bytes of shared memory a config may plan for (A100 164 KiB, H100 228 KiB)


def config(block_m: int, block_n: int, block_k: int, group_m: int, num_warps: int, num_stages: int) -> triton.Config:
    """One tile configuration, valid for every MoE GEMM kernel."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=num_warps, num_stages=num_stages)


INTERPRETER_CONFIG = config(16, 64, 32, 2, 4, 1)
MMA_CONFIGS = [
    config(128, 256, 64, 8, 8, 3),
    config(128, 128, 64, 8, 8, 3),
    config(128, 128, 32, 8, 4, 4),
    config(64, 128, 64, 8, 4, 4),
    config(64, 64, 64, 8, 4, 4),
    config(64, 64, 32, 8, 4, 3),
]
IEEE_CONFIGS = [  # 64x64 at 4 warps, BLOCK_K 16 or 64x32 spill a few bytes in some kernel on sm_90 or sm_80
    config(64, 64, 32, 8, 8, 3),
    config(32, 64, 32, 8, 4, 3),
    config(32, 32, 32, 8, 4, 3),  # the unaligned-rows fallback: 32x64 spills 8 B in the dual wgrad on sm_80
]

# Per kernel: fp32 accumulator tiles held through the K loop, operand tiles loaded per K step (the A
# operand [BLOCK_M, BLOCK_K] and B operand [BLOCK_K, BLOCK_N] counts, for shared memory), and the
# most accumulator values per thread on sm_90 (the dh epilogue's live tiles limit dh). Before sm_90
# mma.sync also holds operand fragments in registers (wgmma reads them from shared memory): half.
# Measured with the compile check (ptxas -v, sm_90 and sm_80, bf16 and fp32): no spills within these.
LIMITS = {
    "up": {"acc_tiles": 2, "a_tiles": 1, "b_tiles": 2, "per_thread": 128},
    "down": {"acc_tiles": 1, "a_tiles": 1, "b_tiles": 1, "per_thread": 128},
    "dx": {"acc_tiles": 1, "a_tiles": 2, "b_tiles": 2, "per_thread": 128},
    "dh": {"acc_tiles": 1, "a_tiles": 1, "b_tiles": 1, "per_thread": 64},
    "wgrad": {"acc_tiles": 2, "a_tiles": 1, "b_tiles": 2, "per_thread": 128},
    "wgrad_one": {"acc_tiles": 1, "a_tiles": 1, "b_tiles": 1, "per_thread": 128},
}


def fits(kind: str, cfg: triton.Config, ieee: bool, arch: int = 90) -> bool:
    """Whether `cfg` can run kernel `kind` on sm_`arch` without spilling registers or overflowing shared memory."""
    lim, kw = LIMITS[kind], cfg.kwargs
    acc = lim["acc_tiles"] * kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * cfg.num_warps)
    stage = (lim["a_tiles"] * kw["BLOCK_M"] + lim["b_tiles"] * kw["BLOCK_N"]) * kw["BLOCK_K"] * (4 if ieee else 2)
    per_thread = lim["per_thread"] if arch >= 90 else lim["per_thread"] // 2
    return acc <= per_thread and stage * cfg.num_stages <= SMEM_BUDGET


def candidates(kind: str, ieee: bool, align: int = 16, arch: int = 90) -> list[triton.Config]:
    """The configs the autotuner may pick for kernel `kind` on sm_`arch` when operand rows start at
    multiples of `align` elements (the kernels' ALIGN). Rows not 16-byte aligned load element by
    element, and only the smallest tile (the last of each list) then stays clear of spills."""
    kept = [c for c in (IEEE_CONFIGS if ieee else MMA_CONFIGS) if fits(kind, c, ieee, arch)]
    return kept if align * (4 if ieee else 2) >= 16 else kept[-1:]


_TUNERS: list[triton.runtime.Autotuner] = []


def _arch() -> int:
    """The compile target's CUDA compute capability (e.g. 90); 90 for other backends (no limits known)."""
    arch = triton.runtime.driver.active.get_current_target().arch
    return arch if isinstance(arch, int) else 90


def autotune(kind: Callable[[dict], str], key: list[str], reset_to_zero: list[str] | None = None):
    """`triton.autotune` for a MoE GEMM kernel; `kind(constexpr kwargs)` names its LIMITS entry, the
    kernel's `IEEE` and `ALIGN` arguments prune the list. Triton adds the tensor arguments' dtypes to `key`."""
    def prune(configs, named_args, **kwargs):
        kept = [c for c in candidates(kind(kwargs), kwargs["IEEE"], kwargs["ALIGN"], _arch()) if c in configs]
        return kept or configs[-1:]

    def wrap(fn):
        configs = [INTERPRETER_CONFIG] if INTERPRETED else MMA_CONFIGS + IEEE_CONFIGS
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune},
                                reset_to_zero=reset_to_zero, cache_results=True)(fn)
        _TUNERS.append(tuner)
        return tuner

    return wrap


@contextlib.contextmanager
def forced_config(cfg: triton.Config) -> Iterator[None]:
    """Run every MoE GEMM kernel with `cfg` inside the block, no tuning or pruning (tests run the
    GPU tile sizes through the interpreter this way). Not thread-safe: it swaps the tuners' lists."""
    saved = [t.configs for t in _TUNERS]
    try:
        for t in _TUNERS:
            t.configs = [cfg]
        yield
    finally:
        for t, configs in zip(_TUNERS, saved):
            t.configs = configs


def min_block_n(tuner: triton.runtime.Autotuner, ieee: bool) -> int:
    """The narrowest BLOCK_N `tuner` may run with for this dtype's config list (sizes buffers indexed
    by column tile); a forced or interpreter config is the whole list."""
    own = [c for c in tuner.configs if c in (IEEE_CONFIGS if ieee else MMA_CONFIGS)] or tuner.configs
    return min(c.kwargs["BLOCK_N"] for c in own)
