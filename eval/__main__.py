"""`python -m eval ...` is `python -m eval.lm_eval_cli ...`: lm-eval's CLI with the jtok model."""

from eval.lm_eval_cli import main

main()
