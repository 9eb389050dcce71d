"""``python -m diffmem.cli`` (and ``accelerate launch -m diffmem.cli scan ...``)."""

import sys

from diffmem.cli.main import main

sys.exit(main())
