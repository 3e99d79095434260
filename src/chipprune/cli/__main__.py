"""`python -m chipprune.cli`: the `chip` command."""

import sys

from chipprune.cli import main

sys.exit(main())
