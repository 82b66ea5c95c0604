"""``python -m lossfuse.bench``: the same as the ``lossfuse-bench`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
