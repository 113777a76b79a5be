"""`python -m m2pt_fast.chat`: runs m2pt_fast.evaluation.chat, whose docstring says how."""
import sys

from m2pt_fast.evaluation.chat import main

if __name__ == "__main__":
    sys.exit(main())
