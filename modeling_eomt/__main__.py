"""`python -m modeling_eomt segment ...` (or `export ...`) runs the `eomt` command line."""

import sys

from .cli import main

sys.exit(main())
