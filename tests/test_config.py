from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.config import DEFAULT_USER_AGENT, config_path, load_config, parse_config
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_config_is_valid_and_matches_the_spec_defaults() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.daemon.workers == 16 and config.daemon.database == ROOT / "data" / "backfilld.sqlite3"
    assert config.admin.listen == "127.0.0.1:8470" and config.admin.token_file == ROOT / "admin.token"
    assert config.limits.page_size == 100 and config.limits.max_response_bytes == 8_388_608
    assert config.retry.max_attempts == 4 and config.network.per_host_rate == 8.0
    assert config.network.allow_private_addresses is False
    assert config.network.user_agent == DEFAULT_USER_AGENT
    assert len(config.atproto.collections) == 4


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    config = parse_config({}, path=tmp_path / "c.toml")
    assert config.daemon.database == tmp_path / "data" / "backfilld.sqlite3"
    assert config.limits.did_cache_ttl == 86400.0


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    config = parse_config(
        {"daemon": {"database": "x/db.sqlite3"}, "admin": {"token_file": "t"}},
        path=tmp_path / "sub" / "c.toml",
    )
    assert config.daemon.database == tmp_path / "sub" / "x" / "db.sqlite3"
    assert config.admin.token_file == tmp_path / "sub" / "t"


def test_empty_token_file_disables_admin(tmp_path: Path) -> None:
    assert parse_config({"admin": {"token_file": ""}}, path=tmp_path / "c.toml").admin.token_file is None


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"daemon": {"workers": 0}}, "daemon.workers: must be an integer >= 1"),
        ({"daemon": {"workers": "4"}}, "daemon.workers: must be an integer"),
        ({"daemon": {"workers": True}}, "daemon.workers: must be an integer"),
        ({"daemon": {"log_format": "xml"}}, "daemon.log_format: must be one of auto, json, console"),
        ({"daemon": {"shutdown_grace": -1}}, "daemon.shutdown_grace: must be a number >= 0"),
        ({"limits": {"page_timeout": 0}}, "limits.page_timeout: must be a number > 0"),
        ({"limits": {"page_timeout": float("nan")}}, "limits.page_timeout: must be a number"),
        ({"limits": {"pagesize": 10}}, "limits.pagesize: unknown key"),
        ({"bogus": {}}, "bogus: unknown section"),
        ({"limits": 5}, "limits: must be a table"),
        ({"admin": {"listen": "localhost"}}, "admin.listen: must be"),
        ({"admin": {"listen": "127.0.0.1:99999"}}, "admin.listen: must be"),
        ({"atproto": {"relay": "ftp://x"}}, "atproto.relay: must be an http:// or https:// URL"),
        ({"atproto": {"collections": []}}, "atproto.collections: must be a non-empty array"),
        ({"atproto": {"collections": ["not an nsid"]}}, "atproto.collections: invalid NSID"),
        (
            {"network": {"allow_private_addresses": "yes"}},
            "network.allow_private_addresses: must be true or false",
        ),
        ({"network": {"per_host_rate": -1}}, "network.per_host_rate: must be a number >= 0"),
        ({"retry": {"max_attempts": 0}}, "retry.max_attempts: must be an integer >= 1"),
    ],
)
def test_bad_values_are_errors_naming_the_key(tmp_path: Path, data: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, path=tmp_path / "c.toml")
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {"daemon": {"workers": 0, "x": 1}, "retry": {"backoff_cap": "big"}}, path=tmp_path / "c.toml"
        )
    assert len(caught.value.problems) == 3


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\nworkers = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_config_path_precedence() -> None:
    assert config_path("a.toml", {"BACKFILLD_CONFIG": "b.toml"}) == Path("a.toml")
    assert config_path(None, {"BACKFILLD_CONFIG": "b.toml"}) == Path("b.toml")
    assert config_path(None, {}) == Path("config.toml")


toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=30),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
KNOWN = {
    "daemon": ["database", "workers", "shutdown_grace", "log_format", "log_level", "max_records_queue"],
    "admin": ["listen", "token_file"],
    "atproto": ["relay", "plc_directory", "collections"],
    "limits": ["page_size", "page_timeout", "max_response_bytes", "did_cache_ttl", "max_discovered_dids"],
    "retry": ["max_attempts", "backoff_base", "backoff_cap"],
    "network": ["per_host_concurrency", "per_host_rate", "allow_private_addresses", "user_agent"],
}
documents = st.dictionaries(
    st.sampled_from([*KNOWN, "other"]),
    st.one_of(
        toml_values,
        st.dictionaries(st.sampled_from([k for keys in KNOWN.values() for k in keys] + ["zzz"]), toml_values),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_random_documents_load_or_raise_config_error(data: dict[str, object]) -> None:
    try:
        parse_config(data, path=Path("/tmp/c.toml"))
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_never_raise_anything_else(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.toml"
    path.write_bytes(raw)
    with contextlib.suppress(ConfigError):
        load_config(path)


def test_shipped_config_round_trips_through_tomllib() -> None:
    data = tomllib.loads((ROOT / "config.toml").read_text())
    assert parse_config(data, path=ROOT / "config.toml") == load_config(ROOT / "config.toml")
