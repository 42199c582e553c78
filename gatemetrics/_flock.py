"""The engine's one non-blocking ``flock`` attempt, and a short-held exclusive lock with a timeout.

:func:`try_flock` is the single place that tells contention (another holder: ``EWOULDBLOCK``,
``EAGAIN``, or ``EACCES``, which some file systems, NFS among them, return for a lock held
elsewhere) from a real error (``EBADF``, ``ENOLCK``, ``EOPNOTSUPP``: the lock cannot work, which
is raised). Shards (the lifetime lock), the aggregator (the directory lock, through
:func:`flock_fd` and :func:`exclusive_flock`) and the release gate's audit log (through
:func:`flock_until`, exported as ``gatemetrics.flock_until``) all classify with it.

filelock costs tens of times a bare ``flock`` per acquire and release (fork bookkeeping and path
handling in Python; figures in benchmarks/PROFILE.md, "Costs behind design choices"). The
directory lock is taken by every aggregation and every ``GET /metrics``, so it uses this.
(Shards hold their lifetime ``flock`` on their own data file, see :mod:`gatemetrics.shards`; the
audit log locks its own descriptors.) Semantics match filelock's with ``fallback_to_soft=False``:

* the lock is the kernel's ``flock`` on a file that is created if missing (never its directory)
  and never deleted; the kernel frees it when the holder dies, SIGKILL included;
* two holders exclude each other whether they are processes or two calls in one process (each
  call opens its own file description), and a forked child never inherits a held lock from
  this helper, because the descriptor is opened per call and closed on release;
* a file system without ``flock`` raises ``OSError``: there is no silent fallback;
* waiting polls with a short back-off (the kernel's blocking ``flock`` cannot time out);
* the lock file is opened without following a symlink, relative to a directory descriptor when
  one is given, and must be an empty regular file with one link: anything else under its name
  (a symlink, FIFO, socket, directory, a hard link of another file, a file with data) was
  planted, and raises :class:`HostileLockFile` instead of being created through or locked (a
  hard link of a live shard would otherwise make us wait on that shard owner's lifetime lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager

from gatemetrics.errors import LockTimeoutError

__all__ = [
    "CONTENTION",
    "HostileLockFile",
    "exclusive_flock",
    "flock_fd",
    "flock_until",
    "shared_flock",
    "try_flock",
]

_FIRST_WAIT_S = 0.0005
_MAX_WAIT_S = 0.02

#: The errnos of a non-blocking ``flock`` that mean "someone else holds it".
CONTENTION = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})

_NOT_OURS = frozenset({errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP})


class HostileLockFile(OSError):
    """Something other than a lock file sits under a lock file's name (see the module doc)."""


@contextmanager
def exclusive_flock(
    path: str,
    *,
    timeout: float,
    mode: int = 0o644,
    dir_fd: int | None = None,
    shown: str | None = None,
) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the ``with`` block.

    ``path`` is relative to ``dir_fd`` when that is given; errors name ``shown`` (default:
    ``path``). Raises :class:`LockTimeoutError`
    when the lock is not free within ``timeout`` seconds (``0``: one attempt),
    :class:`HostileLockFile` when the name holds anything but an empty regular file with one
    link, and ``OSError`` when the lock file cannot be opened or locked.
    """
    with _held_flock(path, timeout, mode, dir_fd, shown, shared=False):
        yield


@contextmanager
def shared_flock(
    path: str,
    *,
    timeout: float,
    mode: int = 0o644,
    dir_fd: int | None = None,
    shown: str | None = None,
) -> Iterator[None]:
    """:func:`exclusive_flock`, but shared: any number of shared holders at once, none while an
    exclusive holder has it (and no exclusive holder while a shared one has it)."""
    with _held_flock(path, timeout, mode, dir_fd, shown, shared=True):
        yield


@contextmanager
def _held_flock(
    path: str, timeout: float, mode: int, dir_fd: int | None, shown: str | None, *, shared: bool
) -> Iterator[None]:
    fd = _open_lock_file(path, mode, dir_fd, shown or path)
    try:
        flock_fd(fd, shown or path, timeout, shared=shared)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(path: str, mode: int, dir_fd: int | None, shown: str) -> int:
    # O_NONBLOCK: opening a planted FIFO must not wait for a writer.
    base = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | base, mode, dir_fd=dir_fd)
        except PermissionError:
            # Another user's lock file that we may read but not write: flock works on any fd.
            fd = os.open(path, os.O_RDONLY | base, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _NOT_OURS:
            raise HostileLockFile(exc.errno, f"not a lock file ({exc.strerror})", shown) from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != 0:
        os.close(fd)
        what = (
            "not a regular file"
            if not stat.S_ISREG(st.st_mode)
            else "a hard link of another file"
            if st.st_nlink != 1
            else "not empty"
        )
        raise HostileLockFile(errno.EINVAL, f"not a lock file ({what})", shown)
    return fd


def try_flock(fd: int, *, shared: bool = False) -> bool:
    """One non-blocking attempt at an exclusive (or, with ``shared``, a shared) ``flock``.

    True if it is now held through ``fd``'s open file description, False if another holder has
    it (contention, see the module documentation: for a shared attempt, an exclusive holder);
    ``OSError`` for anything else.
    """
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in CONTENTION:
            return False
        raise
    return True


def flock_until(
    fd: int,
    deadline: float,
    *,
    path: str,
    timeout: float,
    first_wait: float = _FIRST_WAIT_S,
    max_wait: float = _MAX_WAIT_S,
    shared: bool = False,
) -> None:
    """Take an exclusive (``shared``: a shared) ``flock`` on ``fd``, polling until ``deadline``
    (at least one try).

    ``deadline`` is on :func:`time.monotonic`'s clock; the kernel's blocking ``flock`` cannot
    time out, so waiting polls with a back-off from ``first_wait`` doubling up to ``max_wait``
    seconds. Raises :class:`LockTimeoutError` naming ``path`` and ``timeout`` (the caller's
    whole wait, which may have begun before this call) when the lock is not free by
    ``deadline``, and ``OSError`` for an error that is not contention.
    """
    wait = first_wait
    while not try_flock(fd, shared=shared):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LockTimeoutError(path, timeout) from None
        time.sleep(min(wait, remaining))
        wait = min(wait * 2, max_wait)


def flock_fd(fd: int, path: str, timeout: float, *, shared: bool = False) -> None:
    """Take an exclusive (``shared``: a shared) ``flock`` on ``fd`` within ``timeout`` seconds
    (``path`` names it in the :class:`LockTimeoutError`)."""
    flock_until(fd, time.monotonic() + timeout, path=path, timeout=timeout, shared=shared)
