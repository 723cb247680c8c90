"""`python -m qdistill` (and `torchrun ... -m qdistill`): the command line."""

import sys

from qdistill.cli import main

sys.exit(main())
