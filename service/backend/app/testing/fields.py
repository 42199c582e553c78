"""The one error the gate's domain raises for a bad argument: which field, what rule, why.

The domain constructors (:class:`~backend.app.testing.release_policy.ReleasePolicyResult`,
:class:`~backend.app.testing.release_gate.ReleaseOverride`, the arguments of
:meth:`~backend.app.testing.release_gate.ReleaseGate.check` and of
:meth:`~backend.app.testing.release_policy.ReleasePolicy.evaluate`) are where every rule is
checked. Each refusal is a :class:`FieldError` naming the field and a stable ``code``, so a
caller that reports errors (the HTTP app maps them to its JSON errors) needs no second copy of
the rules. The two concrete classes keep the built-in meaning: a wrong type is a
:class:`TypeError`, a bad value a :class:`ValueError`.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "INCONSISTENT_RESULT",
    "INVALID_VALUE",
    "UNKNOWN_REASON",
    "UNKNOWN_VERDICT",
    "WRONG_TYPE",
    "FieldError",
    "FieldTypeError",
    "FieldValueError",
    "shown",
]

#: The argument has the wrong type (:class:`FieldTypeError` always carries this code).
WRONG_TYPE: Final = "wrong_type"
#: A well-typed value out of range, blank, or holding control characters.
INVALID_VALUE: Final = "invalid_value"
#: A verdict that is not a :class:`~backend.app.testing.release_policy.ReleaseVerdict` value.
UNKNOWN_VERDICT: Final = "unknown_verdict"
#: A reason that is not a :class:`~backend.app.testing.release_policy.BlockReasonCode` value.
UNKNOWN_REASON: Final = "unknown_reason"
#: A verdict below the minimum its reasons imply (a RELEASE_OK with reasons, ...).
INCONSISTENT_RESULT: Final = "inconsistent_result"


class FieldError(Exception):
    """An argument the domain refuses. ``field`` is the argument's name as the constructor
    spells it (``reasons[1]`` for an item of a list); ``code`` one of this module's codes;
    ``message`` (also ``str(exc)``) says what was wrong. Catch this class to report any
    refusal; the subclasses are also ``TypeError`` or ``ValueError``."""

    code: str = INVALID_VALUE

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[object, ...]:
        # The keyword-only code is not in args: rebuild from all three (for pickling).
        return (_rebuild, (type(self), self.field, self.message, self.code))


def _rebuild(cls: type[FieldError], field: str, message: str, code: str) -> FieldError:
    return cls(field, message, code=code)


class FieldTypeError(FieldError, TypeError):
    """An argument of the wrong type (code :data:`WRONG_TYPE`)."""

    code = WRONG_TYPE


class FieldValueError(FieldError, ValueError):
    """A well-typed argument whose value breaks a rule (code :data:`INVALID_VALUE` unless a
    more precise one applies)."""


def shown(text: str, limit: int = 64) -> str:
    """``text`` quoted for an error message, cut short: a caller may pass kilobytes of it."""
    quoted = repr(text)
    return quoted if len(quoted) <= limit else quoted[: limit - 3] + "..."
