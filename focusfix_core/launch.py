"""The command line's entry (`python -m focusfix_core`, the `focusfix` command): starts `cli.main`, whose import
loads torch, for seconds; a Ctrl-C in them ends with one line and exit 130, as a Ctrl-C later does."""
import sys


def main(argv=None) -> int:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:  # nothing has started: no traceback
        print("interrupted while starting: nothing was read or written", file=sys.stderr)
        return 130
    return cli_main(argv)
