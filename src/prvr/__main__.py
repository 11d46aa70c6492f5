"""`python -m prvr` runs the `prvr` command (prvr.main)."""
import sys

from .main import main

sys.exit(main())
