"""``python -m flora ...``: the `flora` command line (also what ``torchrun -m flora train ...`` runs)."""

import sys

from flora.cli import main

sys.exit(main())
