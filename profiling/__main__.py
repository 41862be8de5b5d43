"""``python -m moela.profiling``: see :mod:`moela.profiling.cli` (``--help`` lists the commands)."""

import sys

from moela.profiling.cli import main

if __name__ == "__main__":
    sys.exit(main())
