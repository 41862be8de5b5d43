"""``python -m moela.train`` (see ``moela.train.cli``)."""

import sys

from .cli import main

sys.exit(main())
