"""Weights in and out of flowjax: PyTorch teachers in, safetensors out."""

import argparse
import sys


def fail(message: str) -> None:
    """A command line's bad input: one line on stderr, exit status 2 (as every flowjax error)."""
    print(f"flowjax: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def parser_class(usage: str) -> type[argparse.ArgumentParser]:
    """An ArgumentParser whose errors are `fail`'s one line, ending with `usage`."""

    class OneLine(argparse.ArgumentParser):
        def error(self, message: str) -> None:
            fail(f'{message} (usage: {usage})')

    return OneLine
