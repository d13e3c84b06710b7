"""``python -m pneumoloc`` (and ``torchrun -m pneumoloc``)."""

import sys

from pneumoloc.cli import main

sys.exit(main())
