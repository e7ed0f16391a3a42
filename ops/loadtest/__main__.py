"""``python -m ops.loadtest SCENARIO.toml [options]``: the same as ``coscribe loadtest``."""

from __future__ import annotations

import sys

from ops.loadtest.command import main

if __name__ == "__main__":  # spawned load processes import this module too: run nothing then
    sys.exit(main())
