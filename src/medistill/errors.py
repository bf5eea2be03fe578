"""One exception type for every user-facing failure.

Raise :class:`MedistillError` with a message that names the file, field or value and the problem.
The CLI prints such errors as one line (no traceback unless ``--debug``) and exits non-zero.
"""

from __future__ import annotations


class MedistillError(Exception):
    """A problem with the user's input or environment, explained in one line."""
