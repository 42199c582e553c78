"""gatemetrics._process.fork_flag: 1 in the process that made it, 0 in any forked child,
whether the fork ran Python's fork hooks (os.fork) or not (libc's fork through ctypes)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gatemetrics._process import ForkFlag, _PidFlag, fork_flag
from tests.processes import run_python
from tests.shard_tools import in_forked_child

MAKERS: list[Callable[[], ForkFlag]] = [fork_flag, _PidFlag]

LIBC_FORK = """
import ctypes
from gatemetrics._process import _PidFlag, fork_flag
flag = fork_flag() if sys.argv[1] == "fork_flag" else _PidFlag()
parent = flag[0]
pid = ctypes.CDLL(None, use_errno=True).fork()  # libc's fork: no os.register_at_fork hooks
if pid == 0:
    os._exit(10 + flag[0])
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(parent, status - 10, flag[0], flush=True)
"""


def test_the_fork_flag_is_a_wiped_on_fork_page_where_the_kernel_has_one() -> None:
    flag = fork_flag()
    assert not isinstance(flag, _PidFlag)  # Linux >= 4.14: MADV_WIPEONFORK
    assert flag[0] == 1


@pytest.mark.parametrize("make", MAKERS, ids=["fork_flag", "_PidFlag"])
def test_the_fork_flag_is_1_in_its_maker_and_0_in_an_os_fork_child(
    make: Callable[[], ForkFlag],
) -> None:
    flag = make()
    assert flag[0] == 1
    assert in_forked_child(lambda: flag[0] == 0)
    assert flag[0] == 1
    assert in_forked_child(lambda: make()[0] == 1)  # a child's own flag is its own


@pytest.mark.parametrize("kind", ["fork_flag", "_PidFlag"])
def test_the_fork_flag_is_0_in_a_libc_fork_child_that_ran_no_fork_hooks(kind: str) -> None:
    done = run_python(LIBC_FORK, kind)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "1"]
