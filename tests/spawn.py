"""Run a function on N CPU ranks (gloo, spawned processes) from a test; a rank's error fails the test with its
message."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init_file: str, errors, fn: Callable, args: tuple) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        fn(rank, *args)
    except BaseException as e:  # reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(world: int, fn: Callable, *args, folder: Path) -> None:
    """`fn(rank, *args)` on `world` ranks with a process group initialised through a file in `folder`; `fn` must be
    a module-level function (spawned processes import it). One thread per process: ranks share the cores."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_file = Path(folder) / f"init_{uuid.uuid4().hex}"
    try:
        mp.start_processes(_rank_main, args=(world, str(init_file), errors, fn, args), nprocs=world, join=True,
                           start_method="spawn")  # fmt: skip
    finally:
        messages = []
        while not errors.empty():
            messages.append(errors.get())
    assert not messages, "\n".join(messages)
