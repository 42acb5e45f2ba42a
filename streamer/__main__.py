"""`python -m streamer` runs the command line, as the `cdr-streamer` script does."""

from __future__ import annotations

import sys

from streamer.cli import main

sys.exit(main())
