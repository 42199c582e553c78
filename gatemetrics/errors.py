"""The exception hierarchy of gatemetrics.

Every error subclasses :class:`GatemetricsError` *and* the built-in that describes it best, so
callers can catch either ``ValueError``/``OSError``/``TimeoutError`` or ours.
"""

from __future__ import annotations

__all__ = ["GatemetricsError", "LockTimeoutError", "SchemaError", "ShardWriteError"]


class GatemetricsError(Exception):
    """Base class of every error raised on purpose by gatemetrics."""


class SchemaError(GatemetricsError, ValueError):
    """Data does not fit a schema: unknown family or label value, wrong type, bad count.

    ``field`` names the offending place as a dotted path (``"reason_counts.TIER_FAIL"``), or is
    empty when the whole document is wrong.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)

    def __reduce__(self) -> tuple[type[SchemaError], tuple[str, str]]:
        # Keep the two-argument constructor picklable (errors cross process boundaries in tests
        # and in multiprocessing pools).
        return (type(self), (self.field, self.problem))


class ShardWriteError(GatemetricsError, OSError):
    """A shard, archive or textfile could not be written. ``path`` names the target."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple[type[ShardWriteError], tuple[str, str]]:
        return (type(self), (self.path, self.problem))


class LockTimeoutError(GatemetricsError, TimeoutError):
    """A lock could not be taken within its timeout. ``path`` is the lock file."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        super().__init__(f"{path}: lock not acquired within {timeout:g} s")

    def __reduce__(self) -> tuple[type[LockTimeoutError], tuple[str, float]]:
        return (type(self), (self.path, self.timeout))
