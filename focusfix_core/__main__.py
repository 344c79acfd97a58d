"""`python -m focusfix_core ...` — see focusfix_core/cli.py."""
import sys

from .launch import main

sys.exit(main())
