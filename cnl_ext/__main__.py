"""``python -m cnl_ext``: the command line (see :mod:`cnl_ext.cli`)."""
import sys

from .cli import main

sys.exit(main())
