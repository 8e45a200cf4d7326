"""``python -m autoqra.cli``."""

import sys

from autoqra.cli.main import main

sys.exit(main())
