"""One exception type for problems the user can fix (bad file, unknown name, wrong shape).

Command-line entry points catch it and print its message without a traceback; anything else
is a bug and keeps its traceback.
"""
import contextlib
import sys


class FlashitError(Exception):
    """A problem with the user's input, described so that they can act on it."""


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn FlashitError into `prog: error: message` and exit status 2."""
    try:
        yield
    except FlashitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
