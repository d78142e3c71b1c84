"""Export the stock benchmarks' datasets as local folders in Hugging Face layout, for machines without the Hub.

    python -m eval.export_benchmarks OUT_DIR [--benchmarks mmlu arc_easy arc_challenge ceval]

Run it where the Hub (or a warm cache) is available. It writes OUT_DIR/cais/mmlu, OUT_DIR/allenai/ai2_arc and
OUT_DIR/ceval/ceval-exam (a Parquet file per config and split, plus a README.md whose YAML front matter lists
the configs, so the stock config and split names stay valid) and OUT_DIR/lm_eval_tasks/ (YAMLs for lm-eval's
own CLI: `--include_path OUT_DIR/lm_eval_tasks`; they hold absolute paths, rerun with --tasks-only after moving
OUT_DIR). Then evaluate offline with `eval.data_dir=OUT_DIR`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from project.hub import ensure_hub_mode


def write_hf_folder(root: str | os.PathLike, configs: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write {config: {split: datasets.Dataset}} as `config/split-00000-of-00001.parquet` files plus the
    README.md front matter that declares them; the folder is built beside `root` and renamed into place."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{uuid.uuid4().hex[:8]}"
    front = []
    try:
        for config, splits in configs.items():
            files = []
            for split, dataset in splits.items():
                rel = f"{config}/{split}-00000-of-00001.parquet"
                (tmp / config).mkdir(parents=True, exist_ok=True)
                dataset.to_parquet(str(tmp / rel))
                files.append({"split": split, "path": rel})
            front.append({"config_name": config, "data_files": files})
        header = yaml.safe_dump({"configs": front}, sort_keys=False, allow_unicode=True)
        (tmp / "README.md").write_text(f"---\n{header}---\n", encoding="utf-8")
        old = root.parent / f".{root.name}.old-{uuid.uuid4().hex[:8]}"
        if root.exists():
            os.replace(root, old)
        os.replace(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def export(out_dir: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """Download every config the named stock benchmarks need and write their folders; return {dataset: folder}."""
    import datasets

    from eval.benchmarks import ALIASES, STOCK, dataset_configs, write_local_tasks

    out_dir = Path(out_dir).resolve()
    needed: dict[str, list[str]] = {}
    for name in names:
        bench = STOCK[ALIASES.get(name, name)]
        needed.setdefault(bench.dataset, [])
        needed[bench.dataset] += [c for c in dataset_configs(bench.name) if c not in needed[bench.dataset]]
    written: dict[str, Path] = {}
    for repo, configs in needed.items():
        print(f"{repo}: {len(configs)} config(s)", flush=True)
        data = {config: dict(datasets.load_dataset(repo, config)) for config in configs}
        written[repo] = write_hf_folder(out_dir / repo, data)
    write_local_tasks(out_dir, out_dir / "lm_eval_tasks")
    return written


def main(argv: list[str] | None = None) -> int:
    from eval.benchmarks import STOCK

    parser = argparse.ArgumentParser(prog="python -m eval.export_benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (e.g. benchmarks/); pass it later as eval.data_dir")
    parser.add_argument("--benchmarks", nargs="+", default=list(STOCK), choices=list(STOCK), metavar="NAME",
                        help=f"which benchmarks (default: all of {', '.join(STOCK)})")  # fmt: skip
    parser.add_argument("--tasks-only", action="store_true",
                        help="only (re)write OUT_DIR/lm_eval_tasks for the copies already in OUT_DIR")  # fmt: skip
    args = parser.parse_args(argv)
    if args.tasks_only:
        from eval.benchmarks import write_local_tasks

        found = write_local_tasks(args.out_dir, Path(args.out_dir) / "lm_eval_tasks")
        print(f"wrote lm-eval task YAMLs for {sorted(found) or 'nothing (no dataset folders found)'}")
        return 0 if found else 1
    if ensure_hub_mode():
        print("the Hugging Face Hub is unreachable: exporting from the local cache only", file=sys.stderr)
    for repo, folder in export(args.out_dir, args.benchmarks).items():
        print(f"{repo} -> {folder}")
    print(f"now evaluate with eval.data_dir={Path(args.out_dir).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
