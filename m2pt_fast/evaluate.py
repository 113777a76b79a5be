"""`python -m m2pt_fast.evaluate`: runs m2pt_fast.evaluation.evaluate, whose docstring says how."""
import sys

from m2pt_fast.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
