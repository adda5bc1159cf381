"""The one exception type the converters raise for bad input.

A ValueError subclass, so callers that already catch ValueError keep working;
the CLI prints its message (which names the file or entry and the fix) without
a traceback.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be converted as asked."""
