"""`python -m eval.report GLOB... --out DIR`: build the report (eval/report/build.py)."""

import sys

from eval.report.build import main

if __name__ == "__main__":
    sys.exit(main())
