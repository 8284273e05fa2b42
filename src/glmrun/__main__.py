"""``python -m glmrun`` runs the command line."""

import sys

from glmrun.cli import main

sys.exit(main())
