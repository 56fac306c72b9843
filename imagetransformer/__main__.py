"""`python -m imagetransformer` (and `torchrun -m imagetransformer`) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
