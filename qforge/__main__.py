"""`python -m qforge` is the `qforge` command."""
import sys

from .cli import main

sys.exit(main())
