"""Entry point: `python run.py model=jtok_m` trains, validates and evaluates one variant;
`python run.py -m model=baseline,jtok,jtok_m,moe` sweeps them; `stage=eval` / `stage=report` /
`stage=generate` run a single stage. See README.md.

Exit status: 0 done; 2 a user error (one message on stderr, no traceback: `project.config.UserError`);
128 + signal number when SIGTERM (143) or SIGINT (130) stopped training after saving a resumable checkpoint;
1 with a traceback for anything else (a bug)."""

import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from project.config import USER_ERROR

# Noise from Lightning 2.6 on torch 2.13, not actionable by users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def exit_with(message: str, status: int) -> None:
    """Print one message on stderr and exit with `status` (SystemExit passes through Hydra, also under -m)."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


def record_hydra_config(run_dir: Path, cfg: DictConfig, replace: bool) -> None:
    """Write `.hydra/{config,hydra,overrides}.yaml` as Hydra would, but only once the run dir is known to be ours:
    configs/config.yaml sets `hydra.output_subdir: null` because Hydra writes them before `main` runs, and so
    would overwrite the records of a run that this one then refuses to touch. Non-train stages write them only
    into a run dir that has none."""
    from project.io import atomic_write_text
    from project.run_dir import is_rank_zero

    folder = run_dir / ".hydra"
    if not is_rank_zero() or (not replace and (folder / "config.yaml").is_file()):
        return
    hydra_cfg = OmegaConf.to_container(HydraConfig.get(), resolve=False)
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg["overrides"]["task"]))


def run_stage(cfg: DictConfig):
    """Check the stage and the run dir, record the configuration, run the stage."""
    import stages
    from project.config import ConfigError
    from project.run_dir import check_run_dir

    if cfg.stage not in stages.STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is not one of {', '.join(stages.STAGES)}")
    run_dir = Path(cfg.run_dir).resolve()
    if cfg.stage == "train":
        check_run_dir(run_dir, cfg)  # before anything is written into it
    record_hydra_config(run_dir, cfg, replace=cfg.stage == "train")
    if cfg.stage == "train":
        return stages.train(cfg)["val_loss"]
    if cfg.stage == "eval":
        overrides = HydraConfig.get().overrides.task
        stages.evaluate(cfg, explicit_benchmarks=any(o.startswith("eval.benchmarks") for o in overrides))
    elif cfg.stage == "generate":
        stages.generate(cfg)
    else:
        stages.report(cfg)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig):
    from hydra.errors import InstantiationException

    from project.config import UserError
    from project.run_dir import TrainingInterrupted

    try:
        return run_stage(cfg)
    except UserError as exc:
        exit_with(f"error: {exc}", USER_ERROR)
    except InstantiationException as exc:  # a user error raised while Hydra built a data source or module
        if not isinstance(exc.__cause__, UserError):
            raise
        exit_with(f"error: {exc.__cause__}", USER_ERROR)
    except TrainingInterrupted as exc:
        exit_with(str(exc), 128 + exc.signum)
    except KeyboardInterrupt:
        exit_with("interrupted (SIGINT)", 130)


if __name__ == "__main__":
    main()
