"""``python -m bpgrad`` runs the command line (this is also what torchrun launches)."""

import sys

from bpgrad.cli import main

sys.exit(main())
