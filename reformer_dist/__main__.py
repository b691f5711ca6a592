"""`python -m reformer_dist ...` runs the CLI (so `deepspeed --module reformer_dist train ...` works)."""

import sys

from reformer_dist.cli import main

sys.exit(main())
