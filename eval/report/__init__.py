"""The research report over finished runs: the per-run table, then every analysis the runs allow.

    python run.py stage=report runs='runs/multirun_*' report_dir=reports/latest
    python -m eval.report 'runs/multirun_*' --out reports/latest

A glob may match run folders, `summary.json` files, or folders holding runs (Hydra multirun folders with
numbered subfolders). The per-run table compares each run with the `baseline` run of the same sweep
folder and seed (else the mean of its baseline runs). The analyses group runs by variant and settings
(seeds pooled, wherever they lie) and compare each group with the `baseline` and `moe` groups under the
same shared settings. One module per analysis, each owning its records, Markdown and plots:

- overfitting.py: epochs read, train/val gap, best validation loss and its step, warnings;
- seeds.py: mean ± std, every seed's value, delta with Welch's 95% interval, 'within noise' when it holds 0;
- curves.py (metrics.csv): tokens / FLOPs to reach the reference's final loss or facts recall;
- isoflop.py (runs with `train_flops=`): parabola per budget, frontier, compute saving at equal loss;
- scaling.py (JTok-M at several pool sizes): slope per doubling in token-indexed parameters and the N_eff fit;
- capacity.py (facts corpora of several sizes): recall and stored bits vs facts.

The plumbing: runs.py (finding and loading runs), table.py (the per-run table), groups.py (run settings and
groups of seeds), plots.py, fmt.py (Markdown formatting), stats.py and fits.py (statistics and curve fits,
pure functions), section.py (what an analysis gets and gives back) and build.py (build_report, CSV / JSON
and the command line). A new analysis is a new module with a `section(ctx)` function, listed in
build.SECTIONS.
"""

from eval.report.build import build_report, main

__all__ = ["build_report", "main"]
