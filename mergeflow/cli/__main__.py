"""`python -m mergeflow.cli`: the same as the `mergeflow` command."""

import sys

from mergeflow.cli import main

sys.exit(main())
