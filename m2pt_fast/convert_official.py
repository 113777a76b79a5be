"""`python -m m2pt_fast.convert_official`: runs m2pt_fast.method.convert_official, whose docstring says how."""
import sys

from m2pt_fast.method.convert_official import main

if __name__ == "__main__":
    sys.exit(main())
