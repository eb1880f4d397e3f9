"""`diffusers-moc` command line. Each subcommand lives in `diffusers_moc.commands.<name>` with a `register` function.

Exit codes: 0 done, 2 bad input (a config, storyboard, file or flag; one line naming it), 1 the run failed, 130
interrupted (Ctrl-C, or SIGTERM, which unwinds the same way so temporary files are removed). `--debug` shows the
traceback instead. Nothing heavy (torch, diffusers) is imported to build the parser, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

# Subcommand modules, in the order `--help` lists them.
_COMMANDS: list[str] = ["generate", "train"]
#: Longest error line printed (an error never floods the terminal).
MAX_ERROR_CHARS = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusers-moc", description="Mixture of Contexts for diffusers video models")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"diffusers_moc.commands.{name}").register(sub)
    for subparser in sub.choices.values():  # `--debug` also after the subcommand; SUPPRESS keeps the main value
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    return parser


def one_line(error: BaseException) -> str:
    """The message of `error` on one line, cut at `MAX_ERROR_CHARS`."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _terminate(signum, frame):
    # SIGTERM (`kill`, job schedulers) unwinds like Ctrl-C, so temporary files are removed on the way out.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        # A command may say what the interruption left (e.g. that the outputs were complete, or not written).
        print(f"interrupted: {one_line(e)}" if e.args else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from .errors import InputError

        if isinstance(e, InputError):
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: {type(e).__name__}: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
