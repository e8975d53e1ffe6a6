"""``python -m fastdia`` (and ``torchrun ... -m fastdia``): the ``fastdia`` command."""

import sys

from fastdia.cli import main

sys.exit(main())
