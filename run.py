"""Entry point: `python run.py model=jtok_m` trains, validates and evaluates one variant;
`python run.py -m model=baseline,jtok,jtok_m,moe` sweeps them; `stage=eval` / `stage=report`
run a single stage. See README.md."""

import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# Noise from Lightning 2.6 on torch 2.13, not actionable by users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig):
    import stages
    from project.config import ConfigError

    if cfg.stage not in stages.STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is not one of {', '.join(stages.STAGES)}")
    if cfg.stage == "train":
        return stages.train(cfg)["val_loss"]
    if cfg.stage == "eval":
        overrides = HydraConfig.get().overrides.task
        stages.evaluate(cfg, explicit_benchmarks=any(o.startswith("eval.benchmarks") for o in overrides))
    else:
        stages.report(cfg)


if __name__ == "__main__":
    main()
