"""``python -m tlpipe COMMAND ...``: the same as the ``tlpipe`` command."""

import sys

from tlpipe.command_line import main

sys.exit(main())
