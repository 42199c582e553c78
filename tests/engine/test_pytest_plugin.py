"""Tests of gatemetrics.pytest_plugin: fixtures for sync, pytest-asyncio and anyio test suites."""

from __future__ import annotations

import pytest

INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

CONFTEST = """
import pytest
from gatemetrics import Family, Schema

SCHEMA = Schema([Family("jobs_total", "Jobs.", key="jobs", label="kind", values=("a", "b"))])

@pytest.fixture
def gatemetrics_schema():
    return SCHEMA

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""

TESTS = """
import fcntl
import os

import pytest

from gatemetrics import CounterStore, asave
from gatemetrics._format import parse_name

SEEN = []


def locked(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_sync_store_is_bound_write_through(gatemetrics_store, gatemetrics_aggregate):
    assert type(gatemetrics_store) is CounterStore
    gatemetrics_store.increment("jobs", "a")
    result = gatemetrics_aggregate()
    assert result.snapshot().family("jobs") == {"a": 1, "b": 0}
    assert 'gatemetrics_shards{state="live"} 1' in result.render_prometheus()


def shard_files(directory):
    return [p for p in os.listdir(directory) if (parse_name(p) or ("", ""))[1] == "v2"]


def test_first_of_two_isolated_tests(gatemetrics_store, gatemetrics_dir, gatemetrics_aggregate):
    gatemetrics_store.increment("jobs", "b", 5)
    assert gatemetrics_aggregate().snapshot().family("jobs") == {"a": 0, "b": 5}
    shards = shard_files(gatemetrics_dir)
    assert len(shards) == 1
    assert locked(gatemetrics_dir / shards[0])  # the bound store's owner holds its shard
    SEEN.append(gatemetrics_dir)


def test_second_sees_nothing_of_the_first(gatemetrics_dir, gatemetrics_aggregate):
    assert gatemetrics_dir != SEEN[0]
    assert gatemetrics_aggregate().snapshot().family("jobs") == {"a": 0, "b": 0}
    shards = shard_files(SEEN[0])
    assert len(shards) == 1
    assert not locked(SEEN[0] / shards[0])  # teardown released the shard's lifetime lock


@pytest.mark.asyncio
async def test_pytest_asyncio(gatemetrics_store, gatemetrics_dir, gatemetrics_aggregate):
    gatemetrics_store.increment("jobs", "a", 2)
    assert await asave(gatemetrics_store, gatemetrics_dir)
    assert gatemetrics_aggregate(compact=True).snapshot().family("jobs")["a"] == 2


@pytest.mark.anyio
async def test_anyio(gatemetrics_store, gatemetrics_dir, gatemetrics_aggregate):
    gatemetrics_store.increment("jobs", "b", 3)
    assert await asave(gatemetrics_store, gatemetrics_dir)
    assert gatemetrics_aggregate().snapshot().family("jobs")["b"] == 3
"""


def run_pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # A subprocess: the plugin must load through its pytest11 entry point, as for users.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def test_the_fixtures_work_in_sync_asyncio_and_anyio_tests(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_jobs=TESTS)
    result = run_pytest(pytester)
    result.assert_outcomes(passed=5)


def test_a_missing_schema_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_nothing="def test_x(gatemetrics_store):\n    pass\n")
    result = run_pytest(pytester)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*gatemetrics_schema fixture must be overridden*"])


def test_a_store_factory_override_is_enough(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makeconftest(
        """
        import pytest
        from gatemetrics import CounterStore, Family, Schema

        SHOP = Schema([
            Family("shop_orders_total", "Orders.", key="orders", label="outcome",
                   values=("paid", "refused")),
            Family("shop_refusals_total", "Refusals.", key="refusals", label="why",
                   values=("no_stock", "no_money")),
        ])

        class ShopStore(CounterStore):  # knows its own schema, as an application's store does
            def __init__(self):
                super().__init__(SHOP)

            def refuse(self, why):
                self.increment_slots([SHOP.slot("orders", "refused"), SHOP.slot("refusals", why)])

        @pytest.fixture
        def gatemetrics_store_factory():
            return ShopStore
        """
    )
    pytester.makepyfile(
        test_shop="""
        def test_shop(gatemetrics_store, gatemetrics_aggregate):
            gatemetrics_store.refuse("no_money")
            snap = gatemetrics_aggregate().snapshot()
            assert snap.get("refusals", "no_money") == 1
        """
    )
    run_pytest(pytester).assert_outcomes(passed=1)


def test_the_plugin_adds_fixtures_only_and_no_per_test_hooks() -> None:
    """Active in every pytest run of the environment: it must not hook into other tests."""
    import gatemetrics.pytest_plugin as plugin

    hooks = [name for name in dir(plugin) if name.startswith("pytest_")]
    assert hooks == []
    assert sorted(plugin.__all__) == sorted(
        name for name in dir(plugin) if name.startswith("gatemetrics_")
    )
