"""Ahead-of-time compilation of the project's Triton kernels for a GPU this machine does not have.

`aot_target(arch)` makes a stub Triton driver active: kernels launched inside it (through the real
op code, with CPU tensors) are compiled by Triton's CUDA backend for `sm_<arch>` but never run. Its
launcher does nothing, `utils.load_binary` returns dummy handles, the device properties are the
target GPU's, and the benchmarker calls the function once and returns a constant, so that
`triton.autotune` compiles every pruned config (its in-memory and on-disk choices are set aside
meanwhile). `JITFunction.run` is wrapped for the duration to record every launch as a
`CompileRecord` (the launcher never sees the CompiledKernel, nor the config of a compile that
failed). Configs autotune skips (OutOfResources, PTXASError, compile-time assertion) are recorded as
`skipped`. Kernel outputs are uninitialised memory.

    with aot_target(90) as launches:
        kernels.ops.jtok_gate.jtok_gate(...).backward(g)
    for c in launches: print(c.name, c.config, c.asm["ptx"][:100], resources(c))

Must run with TRITON_INTERPRET unset (Triton decides at import time).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler.errors import CompileTimeAssertionFailure
from triton.runtime import driver as _driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.errors import OutOfResources, PTXASError
from triton.runtime.jit import JITFunction

# Per-block limits of the targets (CUDA occupancy tables): opt-in max shared memory, threads, SMs.
TARGETS = {
    90: {
        "name": "H100",
        "max_shared_mem": 232448,
        "max_num_regs": 65536,
        "multiprocessor_count": 132,
        "sm_clock_rate": 1980000,
        "mem_clock_rate": 2619000,
        "mem_bus_width": 5120,
    },
    80: {
        "name": "A100",
        "max_shared_mem": 166912,
        "max_num_regs": 65536,
        "multiprocessor_count": 108,
        "sm_clock_rate": 1410000,
        "mem_clock_rate": 1215000,
        "mem_bus_width": 5120,
    },
}
MAX_THREADS = 1024
SKIPPABLE = (OutOfResources, PTXASError, CompileTimeAssertionFailure)
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class CompileRecord:
    """One kernel launch (or warmup) seen under `aot_target`: compiled, skipped by autotune, or failed."""

    name: str  # kernel function name
    arch: int
    config: dict  # constexpr parameters by name, plus num_warps and num_stages
    status: str = "ok"  # ok | skipped (autotune dropped the config) | failed
    error: str = ""
    kernel: object = None  # the triton CompiledKernel (None when compilation failed)
    grid: tuple = ()
    launched: bool = True  # False for .warmup() compiles

    @property
    def asm(self) -> dict:
        """Every IR stage of the compiled kernel: 'ttir', 'ttgir', 'llir', 'ptx', 'cubin' (bytes)."""
        return {} if self.kernel is None else self.kernel.asm

    @property
    def shared(self) -> int:
        """Dynamic shared memory per block (bytes), as Triton launches it."""
        return 0 if self.kernel is None else int(self.kernel.metadata.shared)

    @property
    def key(self) -> tuple:
        """Identity of the compiled binary (same kernel, constexprs, options and target)."""
        return (
            self.name,
            self.arch,
            self.kernel.hash if self.kernel is not None else repr(sorted(self.config.items())),
        )


class _State:
    records: list[CompileRecord] | None = None
    arch: int = 0
    grid: tuple = ()


def _launcher_cls(src, metadata):
    """A launcher that runs nothing: it only remembers the grid of the last launch."""

    def launch(grid_0, grid_1, grid_2, *_args):
        _State.grid = (grid_0, grid_1, grid_2)

    return launch


class _Utils:
    """`driver.utils` of the stub: properties of the target, dummy module/function handles."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        props = TARGETS[self.arch]
        return {k: v for k, v in props.items() if k != "name"} | {"max_threads_per_block": MAX_THREADS, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        # module None keeps CompiledKernel.__del__ from unloading it through another driver later
        usage = resources_of_cubin(kernel, name)
        # as the CUDA driver reports them: n_spills is the local memory per thread in 4-byte words
        return None, 0, usage["regs"], usage["local"] // 4, MAX_THREADS

    def unload_module(self, module):
        pass


def _benchmarker(fn, quantiles=None, **_):
    """Call the configuration once (it compiles); autotune's failures become `skipped` records."""
    start = len(_State.records)
    try:
        fn()
    except SKIPPABLE:
        for rec in _State.records[start:]:
            if rec.status == "failed":
                rec.status = "skipped"
        raise
    return [1.0] * len(quantiles) if quantiles else 1.0


class AotDriver(DriverBase):
    """Triton driver for a GPU that is not there: compiles for `GPUTarget('cuda', arch, 32)`."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(arch)
        self.launcher_cls = _launcher_cls

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # the device id keys Triton's per-device kernel caches: one per target arch
        return 1000 + self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cpu

    def get_benchmarker(self):
        return _benchmarker

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)


def _config_of(jit_fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    """Constexpr parameters by name (positional or keyword), num_warps and num_stages."""
    values = dict(zip(jit_fn.arg_names, args)) | kwargs
    cfg = {p.name: values[p.name] for p in jit_fn.params if p.is_constexpr and p.name in values}
    cfg = {k: (v.value if isinstance(v, triton.language.constexpr) else v) for k, v in cfg.items()}
    for opt in ("num_warps", "num_stages"):
        if opt in kwargs:
            cfg[opt] = kwargs[opt]
    return cfg


def _recording_run(original):
    """Wrap `JITFunction.run`: record the compiled kernel (or the error) of every call."""

    def run(self, *args, grid, warmup, **kwargs):
        if _State.records is None:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        cfg = _config_of(self, args, kwargs)
        _State.grid = ()
        rec = CompileRecord(self.__name__, _State.arch, cfg, launched=not warmup)
        _State.records.append(rec)
        try:
            kernel = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        except Exception as err:
            msg = str(err).strip()
            rec.status, rec.error = "failed", f"{type(err).__name__}: {msg.splitlines()[0][:300] if msg else ''}"
            raise
        if kernel is None:  # a jit_cache_hook declined the compile
            rec.status, rec.error = "skipped", "jit_cache_hook"
            return kernel
        rec.kernel, rec.grid = kernel, _State.grid
        rec.config.setdefault("num_warps", kernel.metadata.num_warps)
        rec.config.setdefault("num_stages", kernel.metadata.num_stages)
        return kernel

    run.unwrapped = original
    return run


def _autotuners() -> list[Autotuner]:
    """Every live `triton.autotune` wrapper (their caches must not leak across targets)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module attributes warns
        return [o for o in gc.get_objects() if isinstance(o, Autotuner)]


def _never_from_disk(self: Autotuner, tuning_key, configs, bench_fn) -> bool:
    """`Autotuner.check_disk_cache` under `aot_target`: benchmark (compile) every config, read and write nothing."""
    bench_fn()
    return False


@contextlib.contextmanager
def aot_target(arch: int):
    """Compile (never run) every Triton kernel launched inside for sm_<arch>; yields the list of
    `CompileRecord`s, which grows as kernels are launched. Restores the previous driver on exit."""
    if knobs.runtime.interpret or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("aot_target needs TRITON_INTERPRET unset (Triton decides at import time)")
    if arch not in TARGETS:
        raise ValueError(f"arch {arch} is not one of {sorted(TARGETS)}")
    saved_driver = _driver._active
    saved_state = (_State.records, _State.arch)
    saved_cache = knobs.autotuning.cache
    tuners = _autotuners()
    # autotune's per-key choice, its cached benchmarker and its on-disk timings (which would also
    # hand this stub's constant timings to a real GPU of the same arch sharing the cache) are off
    saved_tuners = [(t, dict(t.cache), t.__dict__.pop("do_bench", None), t.cache_results) for t in tuners]
    original_run, original_disk_cache = JITFunction.run, Autotuner.check_disk_cache
    records: list[CompileRecord] = []
    try:
        # and for tuners made inside the block too (they read `cache_results` at construction)
        Autotuner.check_disk_cache = _never_from_disk
        for t in tuners:
            t.cache.clear()
            t.cache_results = False
        knobs.autotuning.cache = False
        _State.records, _State.arch = records, arch
        _driver.set_active(AotDriver(arch))
        JITFunction.run = _recording_run(getattr(original_run, "unwrapped", original_run))  # nested: innermost records
        yield records
    finally:
        JITFunction.run, Autotuner.check_disk_cache = original_run, original_disk_cache
        known = {id(t) for t in tuners}
        for t in _autotuners():
            if id(t) not in known:  # made inside: forget the stub's choice and benchmarker
                t.cache.clear()
                t.__dict__.pop("do_bench", None)
        _driver._active = saved_driver
        _State.records, _State.arch = saved_state
        knobs.autotuning.cache = saved_cache
        for t, cache, bench, cache_results in saved_tuners:
            t.cache_results = cache_results
            t.cache.clear()
            t.cache.update(cache)
            t.__dict__.pop("do_bench", None)
            if bench is not None:
                t.__dict__["do_bench"] = bench


def capture_launches() -> list[CompileRecord]:
    """The records of the innermost active `aot_target` (so far)."""
    if _State.records is None:
        raise RuntimeError("capture_launches() outside `with aot_target(arch):`")
    return _State.records


def _cache_dir() -> Path:
    path = Path(knobs.cache.dir) / "jtok_compile_check"
    path.mkdir(parents=True, exist_ok=True)
    return path


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@functools.cache
def resources_of_cubin(cubin: bytes, name: str) -> dict:
    """`cuobjdump -res-usage`: registers, stack frame, static shared and local memory per thread."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [str(_BIN / "cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    m = _RES.search(out, out.find(f"Function {name}:") + 1)
    if m is not None and f"Function {name}:" in out:
        reg, stack, shared, local = map(int, m.groups())
        return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}
    raise RuntimeError(f"cuobjdump -res-usage gave no resource line for {name}:\n{out}")


_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_spills(ptx: str, arch: int, enable_fp_fusion: bool = True) -> dict:
    """Re-assemble the PTX with Triton's ptxas flags plus `-v`: stack frame and spill store/load bytes."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}"] + (
        [] if enable_fp_fusion else ["--fmad=false"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, *flags, str(src), "-o", str(src) + ".o"], capture_output=True, text=True, check=True
        ).stderr
    m = _SPILL.search(log)
    if m is None:
        raise RuntimeError(f"ptxas -v printed no spill line:\n{log}")
    stack, stores, loads = map(int, m.groups())
    return {"stack_frame": stack, "spill_stores": stores, "spill_loads": loads}


def resources(rec: CompileRecord) -> dict:
    """regs, stack, local, static_shared (cuobjdump), stack_frame, spill_stores, spill_loads (ptxas -v)
    and shared (dynamic + static bytes) of a compiled record; cached on disk by the kernel's Triton
    hash (reruns do not call ptxas again)."""
    k = rec.kernel
    path = _cache_dir() / f"{k.hash}.json"
    if path.exists():
        return json.loads(path.read_text())
    usage = resources_of_cubin(k.asm["cubin"], k.name)
    usage |= ptxas_spills(k.asm["ptx"], rec.arch, getattr(k.metadata, "enable_fp_fusion", True))
    usage["shared"] = int(k.metadata.shared) + usage["static_shared"]
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(usage))
    os.replace(tmp, path)
    return usage
