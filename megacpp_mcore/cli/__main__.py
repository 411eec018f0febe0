"""``python -m megacpp_mcore.cli``: the console script ``megacpp-mcore``."""

import sys

from megacpp_mcore.cli import main

sys.exit(main())
