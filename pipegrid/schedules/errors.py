"""The one error type for a schedule that is malformed, refused or cannot run.

``ScheduleError`` subclasses ``ValueError`` so callers can treat it as a bad value.
"""

from __future__ import annotations

__all__ = ["ScheduleError"]


class ScheduleError(ValueError):
    """A schedule that is refused, malformed, deadlocks or has a dependency cycle."""
