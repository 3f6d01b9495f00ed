"""``python -m xlip ...``: the same as the ``xlip`` command."""

import sys

from xlip.cli import main

sys.exit(main())
