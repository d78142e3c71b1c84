"""Evaluation of jtok checkpoints: an lm-eval model adapter, benchmark plumbing, the eval stage and the report.

Entry points: `eval.stage.evaluate_checkpoint`, `eval.report.build_report`, `python -m eval` (lm-eval's CLI
with the `jtok` model registered) and `python -m eval.export_benchmarks OUT_DIR`. Modules import lm-eval and
`datasets` lazily, so that the Hub mode can be decided before `datasets` is imported.
"""
