"""`python -m m2pt_fast.plan`: runs m2pt_fast.planning.plan, whose docstring says how."""
import sys

from m2pt_fast.planning.plan import main

if __name__ == "__main__":
    sys.exit(main())
