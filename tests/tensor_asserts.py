"""Tensor comparisons shared by the kernel tests: a stated tolerance, and the offending element named."""

from __future__ import annotations

import torch

# float32: kernel and reference add the same terms in another order (tiles, partial buffers vs MKL/cuBLAS), so
# they differ by a few ulp of the terms (O(1) here), more relative to sums that cancel: hence atol with rtol.
# The worst real comparison reaches <= 1/5 of this bound (AVX2, ATEN_CPU_CAPABILITY=default, MKL_CBWR=COMPATIBLE
# or AVX, one thread), while the deliberately wrong kernels of tests/test_kernels.py (a 1e-3 error) exceed it
# 10-35 times.
ATOL, RTOL = 1e-5, 1e-4


def assert_close(name: str, got: torch.Tensor | None, want: torch.Tensor | None, atol=ATOL, rtol=RTOL) -> None:
    """Raise AssertionError naming the tensor when got and want differ beyond atol + rtol * |want|."""
    assert (got is None) == (want is None), f"{name}: one side is None"
    if got is None:
        return
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    if not bool((err <= bound).all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{name}: max abs err {err.max().item():.3e} (worst at flat index {i}: "
            f"got {got.reshape(-1)[i].item():.6g}, want {want.reshape(-1)[i].item():.6g}; atol={atol}, rtol={rtol})"
        )
