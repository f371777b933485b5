"""``python -m tlpipe predict ...``: the same as the ``tlpipe`` command."""

import sys

from tlpipe.predict import main

sys.exit(main())
