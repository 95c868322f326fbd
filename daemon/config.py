"""Configuration: ``config.toml`` parsed with :mod:`tomllib` into frozen dataclasses (SPEC 4).

Pure: :func:`parse_config` takes the decoded TOML and the file's folder; :func:`load_config` only adds
reading the file. Every problem is collected and reported at once, each naming its key
(``limits.page_size: must be an integer >= 1``), so an operator fixes a file in one pass.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import __version__
from daemon.atproto.syntax import is_valid_nsid
from daemon.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config.toml")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
CONFIG_ENV = "BACKFILLD_CONFIG"
TOKEN_ENV = "BACKFILLD_ADMIN_TOKEN"
PROJECT_URL = "https://github.com/backfilld/backfilld"
DEFAULT_USER_AGENT = f"backfilld/{__version__} (+{PROJECT_URL})"

SECTIONS = ("daemon", "admin", "atproto", "limits", "retry", "sync", "network")
# Servers answer URLs over 16 KiB with 431: 100 CIDs of 59 characters is about 6.6 KB of query.
MAX_GET_BLOCKS_BATCH = 100

DEFAULT_COLLECTIONS = (
    "com.emdashcms.experimental.package.profile",
    "com.emdashcms.experimental.package.release",
    "com.emdashcms.experimental.publisher.profile",
    "com.emdashcms.experimental.publisher.verification",
)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    database: Path | str
    workers: int = 16
    shutdown_grace: float = 20.0
    log_format: str = "auto"
    log_level: str = "info"
    max_records_queue: int = 1_000_000
    lease_timeout: float = 30.0

    @property
    def postgres(self) -> bool:
        """Whether the database is a PostgreSQL URL (section 10) rather than a SQLite path."""
        return isinstance(self.database, str)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: str = "127.0.0.1:8470"
    token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AtprotoConfig:
    relay: str = "https://bsky.network"
    plc_directory: str = "https://plc.directory"
    collections: tuple[str, ...] = DEFAULT_COLLECTIONS


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    page_size: int = 100
    page_timeout: float = 15.0
    max_pages_per_collection: int = 1000
    discovery_page_size: int = 100
    discovery_timeout: float = 15.0
    max_discovery_pages_per_collection: int = 100
    max_discovered_dids: int = 1000
    max_backfill_dids: int = 100
    max_response_bytes: int = 8_388_608
    did_cache_ttl: float = 86400.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 4
    backoff_base: float = 5.0
    backoff_cap: float = 300.0


@dataclass(frozen=True, slots=True)
class SyncConfig:
    mode: str = "verified"
    get_blocks_batch: int = 100
    max_car_bytes: int = 67_108_864
    ordered_collections: bool = True


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    per_host_concurrency: int = 4
    per_host_rate: float = 8.0
    rate_limit_pause: float = 60.0
    allow_private_addresses: bool = False
    user_agent: str = DEFAULT_USER_AGENT
    local_address: str = ""


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    daemon: DaemonConfig
    admin: AdminConfig = field(default_factory=AdminConfig)
    atproto: AtprotoConfig = field(default_factory=AtprotoConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)


class _Reader:
    """Pulls typed values out of one TOML table, collecting problems instead of stopping at the first."""

    def __init__(self, section: str, table: Mapping[str, Any], problems: list[str]) -> None:
        self.section = section
        self.table = table
        self.problems = problems
        self.seen: set[str] = set()

    def _get(self, key: str) -> tuple[bool, Any]:
        self.seen.add(key)
        if key in self.table:
            return True, self.table[key]
        return False, None

    def _bad(self, key: str, what: str) -> None:
        self.problems.append(f"{self.section}.{key}: {what}")

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        present, value = self._get(key)
        if not present:
            return default
        bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
        if not bad and maximum is not None and value > maximum:
            bad = True
        if bad:
            between = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self._bad(key, f"must be an integer {between} (got {value!r})")
            return default
        return int(value)

    def number(self, key: str, default: float, *, minimum: float, exclusive: bool = False) -> float:
        present, value = self._get(key)
        if not present:
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and (value <= minimum if exclusive else value < minimum):
            ok = False
        if not ok or value != value:  # NaN compares unequal to itself
            self._bad(key, f"must be a number {'>' if exclusive else '>='} {minimum:g} (got {value!r})")
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        present, value = self._get(key)
        if not present:
            return default
        if not isinstance(value, bool):
            self._bad(key, f"must be true or false (got {value!r})")
            return default
        return value

    def string(self, key: str, default: str, *, check: Callable[[str], str | None] | None = None) -> str:
        present, value = self._get(key)
        if not present:
            return default
        if not isinstance(value, str):
            self._bad(key, f"must be a string (got {value!r})")
            return default
        if check is not None and (problem := check(value)) is not None:
            self._bad(key, problem)
            return default
        return value

    def raw(self, key: str) -> tuple[bool, Any]:
        return self._get(key)

    def finish(self) -> None:
        for key in self.table:
            if key not in self.seen:
                self.problems.append(f"{self.section}.{key}: unknown key")


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)} (got {value!r})"

    return check


def _http_url(value: str) -> str | None:
    if (
        not (value.startswith("http://") or value.startswith("https://"))
        or len(value.split("://", 1)[1]) == 0
    ):
        return f"must be an http:// or https:// URL (got {value!r})"
    return None


def _listen_address(value: str) -> str | None:
    if value.startswith("unix:"):
        return None if len(value) > len("unix:") else "unix socket path is empty"
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return f'must be "HOST:PORT" or "unix:PATH" (got {value!r})'
    return None


def _ip_address(value: str) -> str | None:
    if value == "":
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f'must be an IP address of this machine, or "" for the system\'s choice (got {value!r})'
    return None


def _database_value(value: str) -> str | None:
    if not value.strip():
        return "must be a file path or a postgresql:// URL"
    if "://" in value and not value.startswith(POSTGRES_SCHEMES):
        return f"must be a file path or a postgresql:// URL (got {value.split('://', 1)[0]}://)"
    return None


def _database(base: Path, value: str) -> Path | str:
    """A SQLite path (resolved against the config's folder), or a PostgreSQL URL kept as it is."""
    if value.startswith(POSTGRES_SCHEMES):
        return value
    return _resolve(base, value)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def parse_config(data: Mapping[str, Any], *, path: Path) -> Config:
    """Validate decoded TOML ``data``; relative paths resolve against ``path``'s folder."""
    problems: list[str] = []
    base = path.resolve().parent
    sections = SECTIONS
    for name, value in data.items():
        if name not in sections:
            problems.append(f"{name}: unknown section")
        elif not isinstance(value, dict):
            problems.append(f"{name}: must be a table")

    def table(name: str) -> _Reader:
        value = data.get(name, {})
        return _Reader(name, value if isinstance(value, dict) else {}, problems)

    d = table("daemon")
    daemon = DaemonConfig(
        database=_database(base, d.string("database", "data/backfilld.sqlite3", check=_database_value)),
        workers=d.integer("workers", 16, minimum=1),
        shutdown_grace=d.number("shutdown_grace", 20.0, minimum=0.0),
        log_format=d.string("log_format", "auto", check=_one_of("auto", "json", "console")),
        log_level=d.string("log_level", "info", check=_one_of("debug", "info", "warning", "error")),
        max_records_queue=d.integer("max_records_queue", 1_000_000, minimum=1),
        lease_timeout=d.number("lease_timeout", 30.0, minimum=1.0),
    )
    d.finish()

    a = table("admin")
    token_file = a.string("token_file", "admin.token")
    admin = AdminConfig(
        listen=a.string("listen", "127.0.0.1:8470", check=_listen_address),
        token_file=_resolve(base, token_file) if token_file else None,
    )
    a.finish()

    p = table("atproto")
    collections = DEFAULT_COLLECTIONS
    present, value = p.raw("collections")
    if present:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            problems.append("atproto.collections: must be a non-empty array of NSID strings")
        else:
            bad = [v for v in value if not is_valid_nsid(v)]
            if bad:
                problems.append(f"atproto.collections: invalid NSID {bad[0]!r}")
            collections = tuple(dict.fromkeys(value))
    atproto = AtprotoConfig(
        relay=p.string("relay", "https://bsky.network", check=_http_url).rstrip("/"),
        plc_directory=p.string("plc_directory", "https://plc.directory", check=_http_url).rstrip("/"),
        collections=collections,
    )
    p.finish()

    lim = table("limits")
    limits = LimitsConfig(
        page_size=lim.integer("page_size", 100, minimum=1),
        page_timeout=lim.number("page_timeout", 15.0, minimum=0.0, exclusive=True),
        max_pages_per_collection=lim.integer("max_pages_per_collection", 1000, minimum=1),
        discovery_page_size=lim.integer("discovery_page_size", 100, minimum=1),
        discovery_timeout=lim.number("discovery_timeout", 15.0, minimum=0.0, exclusive=True),
        max_discovery_pages_per_collection=lim.integer("max_discovery_pages_per_collection", 100, minimum=1),
        max_discovered_dids=lim.integer("max_discovered_dids", 1000, minimum=1),
        max_backfill_dids=lim.integer("max_backfill_dids", 100, minimum=1),
        max_response_bytes=lim.integer("max_response_bytes", 8_388_608, minimum=1024),
        did_cache_ttl=lim.number("did_cache_ttl", 86400.0, minimum=0.0),
    )
    lim.finish()

    r = table("retry")
    retry = RetryConfig(
        max_attempts=r.integer("max_attempts", 4, minimum=1),
        backoff_base=r.number("backoff_base", 5.0, minimum=0.0),
        backoff_cap=r.number("backoff_cap", 300.0, minimum=0.0),
    )
    r.finish()

    sy = table("sync")
    sync = SyncConfig(
        mode=sy.string("mode", "verified", check=_one_of("verified", "list")),
        get_blocks_batch=sy.integer("get_blocks_batch", 100, minimum=1, maximum=MAX_GET_BLOCKS_BATCH),
        max_car_bytes=sy.integer("max_car_bytes", 67_108_864, minimum=1024),
        ordered_collections=sy.boolean("ordered_collections", True),
    )
    sy.finish()

    n = table("network")
    network = NetworkConfig(
        per_host_concurrency=n.integer("per_host_concurrency", 4, minimum=1),
        per_host_rate=n.number("per_host_rate", 8.0, minimum=0.0),
        rate_limit_pause=n.number("rate_limit_pause", 60.0, minimum=0.0),
        allow_private_addresses=n.boolean("allow_private_addresses", False),
        user_agent=n.string(
            "user_agent",
            DEFAULT_USER_AGENT,
            check=lambda v: None if v.strip() and v.isprintable() else "must be a non-empty printable string",
        ),
        local_address=n.string("local_address", "", check=_ip_address),
    )
    n.finish()

    if problems:
        raise ConfigError(problems)
    return Config(
        path=path.resolve(),
        daemon=daemon,
        admin=admin,
        atproto=atproto,
        limits=limits,
        retry=retry,
        sync=sync,
        network=network,
    )


def config_path(explicit: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Path:
    """The config file to use: ``--config``, else ``$BACKFILLD_CONFIG``, else ``./config.toml``."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror or exc})"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML ({exc})"]) from None
    return parse_config(data, path=path)
