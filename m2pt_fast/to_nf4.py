"""`python -m m2pt_fast.to_nf4`: runs m2pt_fast.models.to_nf4, whose docstring says how."""
import sys

from m2pt_fast.models.to_nf4 import main

if __name__ == "__main__":
    sys.exit(main())
