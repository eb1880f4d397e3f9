"""`InputError`: the base of every error about what a user gave (a config, a storyboard, a file, a flag).

The `diffusers-moc` command line prints an `InputError` as one line and exits with code 2; any other exception is a
failure of the run (exit code 1). `ConfigError` (training configs) and `StoryboardError` (storyboards) derive from it.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: the message names the file, field or flag and says what is wrong."""
