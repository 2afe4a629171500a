"""`python -m modeling_eomt.train`: see `modeling_eomt.training.train`."""

import sys

from .training.train import main

if __name__ == "__main__":
    sys.exit(main())
