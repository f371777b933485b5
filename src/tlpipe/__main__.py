"""``python -m tlpipe COMMAND ...``: the same as the ``tlpipe`` command."""

import sys

from tlpipe.commands import main

sys.exit(main())
