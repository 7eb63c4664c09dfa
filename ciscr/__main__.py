"""``python -m ciscr`` is the same as the ``ciscr`` command."""

import sys

from ciscr.cli import main

sys.exit(main())
