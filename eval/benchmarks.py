"""Which lm-eval tasks a benchmark name means, where their data comes from, and loading them.

Stock benchmarks run lm-eval's own task definitions unchanged. Their data comes from the Hub or a warm
Hugging Face cache, or from local copies in `data_dir` (Hugging Face folder layout, as written by
`python -m eval.export_benchmarks`): then small YAMLs that include the stock definition and override only
`dataset_path` shadow the stock names in an extra include folder, so result keys stay the stock ones.
The facts probe runs generated task YAMLs that point the shipped templates at a run's `qa.jsonl`.

Importing this module is cheap; `datasets` is imported by the first TaskManager, so call
`project.hub.ensure_hub_mode` before using the functions that build one.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lm_eval
import yaml

from project.config import UserError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
FACTS_QA_TASKS = Path(__file__).parent / "tasks" / "facts_qa"
FACTS_QA = "facts_qa"
EXPORT_COMMAND = "python -m eval.export_benchmarks OUT_DIR"


@dataclass(frozen=True)
class Benchmark:
    """A stock lm-eval benchmark: its task or group, Hugging Face dataset and defining YAML."""

    name: str  # our name (configs/eval: benchmarks)
    task: str  # lm-eval task or group, also the key of its results
    dataset: str  # Hugging Face dataset repo
    yaml: str  # relative to lm_eval/tasks

    @property
    def folder(self) -> Path:
        return (LM_EVAL_TASKS / self.yaml).parent


STOCK: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("mmlu", "mmlu", "cais/mmlu", "mmlu/default/_mmlu.yaml"),
        Benchmark("arc_easy", "arc_easy", "allenai/ai2_arc", "arc/arc_easy.yaml"),
        Benchmark("arc_challenge", "arc_challenge", "allenai/ai2_arc", "arc/arc_challenge.yaml"),
        Benchmark("ceval", "ceval-valid", "ceval/ceval-exam", "ceval/_ceval-valid.yaml"),
    )
}
ALIASES = {b.task: b.name for b in STOCK.values()}  # "ceval-valid" -> "ceval"


class BenchmarkUnavailable(RuntimeError):
    """A benchmark's data cannot be loaded (offline without a cache or a local copy, or no QA file)."""


class BenchmarkFailed(UserError, RuntimeError):
    """With `strict`, benchmarks failed while scoring; the message names each task and its few-shot count
    (the traceback of a failure that is no settings mistake is in the log), and eval.json holds the rest."""


@dataclass
class LoadedBenchmark:
    """A benchmark's lm-eval Task/Group objects with their data loaded, ready for `simple_evaluate`."""

    name: str
    objects: list[Any]  # top-level lm_eval Task or Group objects
    keys: list[str]  # their result keys
    source: str  # where the data came from
    task_manager: TaskManager


# ---------------------------------------------------------------- task managers


@functools.cache
def task_manager(local_tasks: str | None = None, everything: bool = False) -> TaskManager:
    """lm-eval's TaskManager over the stock folders we need (plus local overrides), built once per process.

    `everything=True` indexes all of lm-eval's tasks instead (15 s): for benchmark names outside `STOCK`.
    """
    from lm_eval.tasks import TaskManager

    paths = [] if everything else sorted({str(b.folder) for b in STOCK.values()})
    if local_tasks:
        paths.append(local_tasks)
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # the local overrides shadow stock names on purpose: no warnings
    try:
        return TaskManager(include_defaults=everything, include_path=paths or None)
    finally:
        index_log.setLevel(level)


def write_local_tasks(data_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write YAMLs running stock benchmarks over the copies found in `data_dir`; return {benchmark: folder}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for bench in STOCK.values():
        folder = (Path(data_dir).expanduser() / bench.dataset).resolve()
        if not (folder / "README.md").is_file():
            continue
        spec = {"include": str(LM_EVAL_TASKS / bench.yaml), "dataset_path": str(folder)}
        header = f"# {bench.task} (lm-eval's stock definition) over the local copy {folder}\n"
        (out_dir / f"{bench.task}.yaml").write_text(header + yaml.safe_dump(spec, sort_keys=False))
        found[bench.name] = folder
    return found


@functools.cache
def local_tasks_dir(data_dir: str) -> tuple[str | None, dict[str, Path]]:
    """A per-process folder of override YAMLs for `data_dir` (None if it holds no known dataset)."""
    out = tempfile.mkdtemp(prefix="jtok-lm-eval-tasks-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    found = write_local_tasks(data_dir, out)
    return (out if found else None), found


# ---------------------------------------------------------------- the stock tasks' structure


def leaf_tasks(manager: TaskManager, name: str) -> list[str]:
    """Names of the leaf tasks under a task, group or tag of the manager's index (no data is loaded)."""
    entry = manager.task_index[name]
    if entry.kind.name == "TAG":
        return sorted(entry.tags)
    if entry.kind.name != "GROUP":
        return [name]
    leaves: list[str] = []
    for member in entry.cfg.get("task", []):
        child = member if isinstance(member, str) else member.get("group") or member.get("task")
        leaves += leaf_tasks(manager, child)
    return leaves


def dataset_configs(name: str) -> list[str]:
    """The dataset config names (e.g. MMLU subjects) a stock benchmark needs, in its YAMLs' order."""
    bench = STOCK[ALIASES.get(name, name)]
    manager = task_manager()
    configs = [manager.task_index[t].cfg.get("dataset_name") for t in leaf_tasks(manager, bench.task)]
    return list(dict.fromkeys(c for c in configs if c))


# ---------------------------------------------------------------- facts_qa


def qa_splits(qa_path: str | os.PathLike) -> list[str]:
    """The template splits present in a QA file, held-out first."""
    with open(qa_path, encoding="utf-8") as f:
        splits = {json.loads(line).get("template_split", "all") for line in f if line.strip()}
    return sorted(splits, key=lambda s: (s != "heldout", s))


def write_facts_qa_tasks(qa_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write one facts_qa task YAML per template split of the QA file; return {task name: YAML path}."""
    qa_path = Path(qa_path).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, Path] = {}
    for split in qa_splits(qa_path):
        template = FACTS_QA_TASKS / f"_facts_qa_{split}_yaml"
        if not template.is_file():
            template = FACTS_QA_TASKS / "_facts_qa_template_yaml"  # no known split: score every item
        name = f"{FACTS_QA}_{split}"
        spec = {"include": str(template), "task": name, "dataset_kwargs": {"data_files": {"test": str(qa_path)}}}
        path = out_dir / f"{name}.yaml"
        path.write_text(f"# facts knowledge probe, {split} templates\n" + yaml.safe_dump(spec, sort_keys=False))
        tasks[name] = path
    return tasks


# ---------------------------------------------------------------- loading


def unavailable_message(bench: Benchmark, error: BaseException, data_dir: str | None) -> str:
    """Why a stock benchmark cannot run, naming its dataset and the two ways to provide it."""
    where = f" ({data_dir} has no {bench.dataset} folder)" if data_dir else ""
    return (
        f"benchmark {bench.name!r} needs the Hugging Face dataset {bench.dataset!r}, which could not be loaded"
        f"{where}: {type(error).__name__}: {error}. Provide it in one of two ways: (1) a warm Hugging Face "
        f"cache: run the evaluation once with Hub access using the same HF_HOME / HF_DATASETS_CACHE; or "
        f"(2) local copies: on a machine with Hub access run `{EXPORT_COMMAND}`, copy OUT_DIR here and pass "
        f"eval.data_dir=OUT_DIR."
    )


def load_benchmark(name: str, data_dir: str | None = None, qa_path: str | None = None,
                   work_dir: str | os.PathLike | None = None) -> LoadedBenchmark:  # fmt: skip
    """Build a benchmark's lm-eval tasks and load their data; raise BenchmarkUnavailable if it cannot be loaded.

    `work_dir` receives the generated facts_qa YAMLs (a temporary folder if None).
    """
    name = ALIASES.get(name, name)
    if name == FACTS_QA:
        return _load_facts_qa(qa_path, work_dir)
    if name not in STOCK:
        return _load_other(name)
    bench = STOCK[name]
    local_dir, found = local_tasks_dir(str(Path(data_dir).expanduser().resolve())) if data_dir else (None, {})
    source = str(found[name]) if name in found else f"{bench.dataset} (Hugging Face Hub / cache)"
    try:
        return _load(name, [bench.task], [bench.task], task_manager(local_dir), source)
    except Exception as exc:  # any failure to build the tasks is a failure to load their data
        raise BenchmarkUnavailable(unavailable_message(bench, exc, data_dir if name not in found else None)) from exc


def _load_facts_qa(qa_path: str | None, work_dir: str | os.PathLike | None) -> LoadedBenchmark:
    if qa_path is None or not Path(qa_path).is_file():
        raise BenchmarkUnavailable(
            f"benchmark 'facts_qa' needs the run's QA file (qa.jsonl of the facts corpus), "
            f"{'none was given' if qa_path is None else f'{qa_path} does not exist'} "
            f"(stage=eval reads it from the summary.json of the run whose checkpoints/ folder holds the checkpoint)"
        )
    if work_dir is None:
        work_dir = tempfile.mkdtemp(prefix="jtok-facts-qa-")
        atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    tasks = write_facts_qa_tasks(qa_path, work_dir)
    try:
        return _load(FACTS_QA, [str(p) for p in tasks.values()], list(tasks), task_manager(), str(qa_path))
    except Exception as exc:
        raise BenchmarkUnavailable(f"benchmark 'facts_qa' cannot load {qa_path}: {type(exc).__name__}: {exc}") from exc


def _load_other(name: str) -> LoadedBenchmark:
    """Any other task or group of lm-eval's index, by its own name (data from the Hub or the cache)."""
    manager = task_manager(everything=True)
    if name not in manager.all_tasks:
        raise ValueError(f"unknown benchmark {name!r}: not one of {[FACTS_QA, *STOCK]} nor an lm-eval task")
    try:
        return _load(name, [name], [name], manager, "lm-eval task index")
    except Exception as exc:
        raise BenchmarkUnavailable(
            f"lm-eval task {name!r} could not be loaded: {type(exc).__name__}: {exc}. Its data must be "
            f"reachable on the Hugging Face Hub or in the local cache (HF_HOME)."
        ) from exc


def _load(name: str, specs: list[str], keys: list[str], manager: TaskManager, source: str) -> LoadedBenchmark:
    loaded = manager.load(specs)
    objects = [loaded["groups"].get(key) or loaded["tasks"][key] for key in keys]
    return LoadedBenchmark(name, objects, keys, source, manager)
