"""Fault injection on `python run.py` subprocesses: SIGKILL at random moments with resumes, SIGTERM / SIGINT,
corrupted checkpoints. Marked `faults` and `slow` (a few minutes): `python -m pytest -q -m faults`."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, offline_env, run_py
from project.checkpoint import CheckpointError, load_model, read_checkpoint
from project.run_dir import read_metrics
from test_train import flip_weight_bytes

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEPS = 60
# Checkpoints every 2 steps, so that a good share of the run is spent writing them and kills land inside writes.
RUN = ("experiment=smoke", "model=jtok_m", "eval.enabled=false", "probe.enabled=false", f"trainer.max_steps={STEPS}",
       "trainer.val_check_interval=10", "checkpoint.every_n_train_steps=2")  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return offline_env(tmp_path_factory.mktemp("fault_cache"))


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Path:
    """The final checkpoint of the same run, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_py(env, *RUN, f"hydra.run.dir={run_dir}")
    return run_dir / "checkpoints" / "last.ckpt"


def start(env: dict[str, str], run_dir: Path, *extra: str) -> subprocess.Popen:
    """`python run.py RUN... EXTRA` in the background, its output to a log beside the run dir."""
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    return subprocess.Popen([sys.executable, "run.py", *RUN, f"hydra.run.dir={run_dir}", *extra], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def rows_on_disk(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows without their empty cells (a column added later gives earlier rows empty cells)."""
    return [{k: v for k, v in row.items() if v != ""} for row in read_metrics(run_dir / "metrics.csv")[1]]


def logged_step(run_dir: Path) -> int:
    """The latest training step in metrics.csv (-1 before the first)."""
    rows = read_metrics(run_dir / "metrics.csv")[1]
    return max((int(r["step"]) for r in rows if r.get("train/loss")), default=-1)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Return once metrics.csv shows `step` (or the process has exited)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and logged_step(run_dir) < step:
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.005)


def assert_same_weights(final_path: Path, reference_path: Path) -> None:
    """Exact equality of every weight and optimizer tensor."""
    final, reference = read_checkpoint(final_path), read_checkpoint(reference_path)
    assert final["global_step"] == reference["global_step"] == STEPS
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], tensor), name
    states = zip(final["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values())
    for ours, theirs in states:
        for key, tensor in theirs.items():
            assert torch.equal(ours[key], tensor), key


def test_sigkill_at_random_moments_then_resume_loses_nothing_and_ends_bit_identical(env, reference, tmp_path):
    """Five SIGKILLs at seeded random moments (some during checkpoint writes, every 2 steps), each followed by a resume
    from last.ckpt. After each kill last.ckpt loads and verifies; the metric rows on disk before a kill are still in
    metrics.csv after the resume; the run ends with the uninterrupted run's weights, bit for bit. That equality is
    exact by construction: a deterministic single-threaded CPU run, resumed from exact copies of the weights,
    optimizer, scheduler and sampler position, redoes the same float operations in the same order."""
    rng = random.Random(13)
    run_dir = tmp_path / "run"
    before_kills: list[list[dict[str, str]]] = []  # metric rows on disk at each kill
    for kill in range(5):
        last = run_dir / "checkpoints" / "last.ckpt"
        resume_step = read_checkpoint(last)["global_step"] if last.exists() else 0
        extra = [f"ckpt_path={last}"] if last.exists() else (["overwrite=true"] if run_dir.exists() else [])
        # Steps past the checkpoint logged by the killed run are dropped and logged again: wait beyond them.
        target = max(resume_step, logged_step(run_dir) if extra else 0) + rng.randint(1, 6)
        proc = start(env, run_dir, *extra)
        wait_for_step(proc, run_dir, min(target, STEPS - 3))
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, f"kill {kill}: the run ended before it was killed"
        before_kills.append(rows_on_disk(run_dir))
        if last.exists():
            load_model(last)  # readable, and its checksum verifies
            step = read_checkpoint(last)["global_step"]
            kept = [r for r in before_kills[-2] if int(r["step"]) < resume_step] if kill and resume_step else []
            assert before_kills[-1][: len(kept)] == kept, f"kill {kill}: rows before the resume at {resume_step} lost"
            assert step >= resume_step

    run_py(env, *RUN, f"hydra.run.dir={run_dir}", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert_same_weights(run_dir / "checkpoints" / "last.ckpt", reference)
    final = rows_on_disk(run_dir)
    steps = [int(r["step"]) for r in final if r.get("train/loss")]
    # In order, each once, to the end. A step may be missing: a kill after a checkpoint is written but before that
    # step's row is (Lightning logs it just after the checkpoint) loses a row that no resume logs again.
    assert steps == sorted(set(steps)) and steps[-1] == STEPS - 1
    losses = {int(r["step"]): r["train/loss"] for r in final if r.get("train/loss")}
    for rows in before_kills:  # every loss logged before a kill is in the final file, unchanged (same computation)
        for row in rows:
            if row.get("train/loss") and int(row["step"]) in losses:
                assert losses[int(row["step"])] == row["train/loss"], row["step"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert [p.name for p in (run_dir / "checkpoints").glob("step*.ckpt")] == [f"step{STEPS:07d}.ckpt"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_save_a_resumable_checkpoint_and_exit_non_zero(env, reference, tmp_path, signum):
    run_dir = tmp_path / "run"
    # No periodic checkpoint before the end: the one the signal writes is the only way to resume.
    proc = start(env, run_dir, "checkpoint.every_n_train_steps=1000")
    wait_for_step(proc, run_dir, 20)
    proc.send_signal(signum)
    assert proc.wait() == 128 + signum
    last = run_dir / "checkpoints" / "last.ckpt"
    step = read_checkpoint(last)["global_step"]
    assert 20 <= step < STEPS
    log = (tmp_path / "run.log").read_text()
    assert f"training stopped by {signal.Signals(signum).name} at step {step}; resume with ckpt_path={last}" in log
    assert not (run_dir / "summary.json").exists()  # an interrupted run never looks finished
    run_py(env, *RUN, f"hydra.run.dir={run_dir}", f"ckpt_path={last}")
    assert_same_weights(last, reference)


def test_a_checkpoint_with_flipped_bytes_is_refused_everywhere(env, reference, tmp_path):
    bad = tmp_path / "bad.ckpt"
    shutil.copy(reference, bad)
    flip_weight_bytes(bad, 400)
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is corrupt"):
        load_model(bad)
    for args in (["stage=eval", f"ckpt_path={bad}"], [*RUN, f"ckpt_path={bad}"]):
        proc = run_py(env, *args, f"hydra.run.dir={tmp_path / 'out'}", check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"error: checkpoint {bad} is corrupt" in proc.stderr and "Traceback" not in proc.stderr
