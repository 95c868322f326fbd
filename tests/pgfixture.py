"""pytest fixtures for a throwaway PostgreSQL server (tests/pgserver.py), as a plugin module.

Register it once, in tests/conftest.py::

    pytest_plugins = ["tests.pgfixture"]

Fixtures:

``pg_server``       session-scoped ``PgServer``; started on first use only, stopped at the end of the session.
``pg_url``          a fresh, empty database for this test: ``postgresql://postgres@127.0.0.1:<port>/<name>``.
``pg_url_factory``  a callable returning another fresh database URL each call (for tests needing several).

Databases are dropped (``WITH (FORCE)``) after their test. If no PostgreSQL binaries are found, tests
using these fixtures are skipped, except when ``$CI`` is set (``CI=true``): there, and whenever the
binaries exist but the server cannot be started, they fail with the reason and the server log's tail.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator

import pytest

from tests.pgserver import PG_BIN_ENV, PgServer, PgServerError, find_pg_bin

_STARTED = pytest.StashKey[PgServer]()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[PgServer]:
    try:
        bin_dir = find_pg_bin()
    except PgServerError as e:
        pytest.fail(str(e), pytrace=False)
    if bin_dir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
            f"/usr/lib/postgresql/*/bin; install PostgreSQL or set ${PG_BIN_ENV}"
        )
        if in_ci():
            pytest.fail(f"{reason} (CI is set, so this is an error, not a skip)", pytrace=False)
        pytest.skip(reason)
    try:
        server = PgServer(bin_dir).start()
    except PgServerError as e:
        pytest.fail(f"could not start the test PostgreSQL server ({bin_dir}): {e}", pytrace=False)
    request.config.stash[_STARTED] = server
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url_factory(pg_server: PgServer) -> Iterator[Callable[[], str]]:
    urls: list[str] = []

    def make() -> str:
        urls.append(pg_server.create_database())
        return urls[-1]

    yield make
    for url in reversed(urls):
        try:
            pg_server.drop_database(url)
        except PgServerError as e:  # the test's own outcome matters more than a failed clean-up
            warnings.warn(f"could not drop test database {url}: {e}", stacklevel=1)


@pytest.fixture
def pg_url(pg_url_factory: Callable[[], str]) -> str:
    return pg_url_factory()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    server = config.stash.get(_STARTED, None)
    if server is not None and config.get_verbosity() >= 0:
        terminalreporter.write_line(
            f"test PostgreSQL {server.server_version} ({server.bin_dir}) as {server.os_user}: "
            f"started in {server.startup_seconds:.2f}s"
        )
