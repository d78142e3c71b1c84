"""lm-eval's own command line with the `jtok` model registered (lm-eval has no plugin discovery).

    python -m eval.lm_eval_cli --model jtok --model_args checkpoint=runs/.../checkpoints/last.ckpt \\
        --tasks arc_easy --num_fewshot 25 --batch_size 16

Every lm-eval flag works as usual (`python -m eval` is the same command). The Hub is probed first: when it is
unreachable, Hugging Face libraries are switched offline so a missing dataset fails at once instead of
retrying. Local copies from `python -m eval.export_benchmarks OUT_DIR` run with
`--include_path OUT_DIR/lm_eval_tasks` under the benchmark names (mmlu, ceval-valid, arc_easy, arc_challenge;
a single subtask such as mmlu_anatomy asked for on its own still reads the Hub).
"""

from __future__ import annotations

from project.hub import ensure_hub_mode


def main() -> None:
    """Decide the Hub mode, register the adapter, then hand the arguments to lm-eval's CLI."""
    ensure_hub_mode()
    from lm_eval.__main__ import cli_evaluate

    import eval.adapter  # noqa: F401  (registers model "jtok")

    cli_evaluate()


if __name__ == "__main__":
    main()
