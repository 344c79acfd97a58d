"""`python -m focusfix_core ...` — see focusfix_core/cli.py."""
import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch loads (seconds): nothing has started, so no traceback
    print("interrupted while starting: nothing was read or written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
