"""Entry point: `python run.py model=jtok_m` trains, validates and evaluates one variant;
`python run.py -m model=baseline,jtok,jtok_m,moe` sweeps them; `stage=eval` / `stage=report`
run a single stage. See README.md."""

import warnings

import hydra
from omegaconf import DictConfig

# Noise from Lightning 2.6 on torch 2.13, not actionable by users.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

STAGES = ("train", "eval", "report")


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig):
    from project.config import ConfigError

    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is not one of {', '.join(STAGES)}")
    if cfg.stage == "train":
        from project.pipeline import train

        summary = train(cfg)
        return summary["val_loss"]
    raise ConfigError(f"stage={cfg.stage} is not available yet")


if __name__ == "__main__":
    main()
