"""The gunicorn worker class of the release-gate service: uvicorn on asyncio's event loop.

``uvicorn_worker.UvicornWorker`` picks uvloop when it is installed (``loop="auto"``). Under
uvloop a worker that exits closes its listening socket's descriptor twice: uvloop closes the
number it was handed, then gunicorn closes its socket object, which still holds that number
(gunicorn logs "Error while closing socket [Errno 9] Bad file descriptor"). If another thread
reused the number in between, as the audit log's thread does for the log file of a check still
in flight during a graceful shutdown, the second close closes *that* file: the check fails with
``EBADF`` (denied), or its line goes to whatever reuses the number next and the log silently
lacks an answered decision. Seen in the end-to-end test with ``--max-requests`` recycling
(about one run in ten). asyncio closes through the socket object, so the second close is a
no-op. The HTTP parser stays ``auto`` (httptools when installed: a parser, it owns no
descriptor).
"""

from __future__ import annotations

from typing import Any, ClassVar

# Untyped, and absent where only the test extra is installed (the typing session).
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped,import-not-found,unused-ignore]

__all__ = ["ReleaseGateWorker"]


class ReleaseGateWorker(UvicornWorker):  # type: ignore[misc,unused-ignore]
    """uvicorn_worker's worker with ``loop="asyncio"``."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**UvicornWorker.CONFIG_KWARGS, "loop": "asyncio"}
