"""``python -m rlm.core.cli``: the ``rlm`` command line."""

import sys

from rlm.core.cli import main

sys.exit(main())
