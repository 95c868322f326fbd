"""The admin bearer token: ``$BACKFILLD_ADMIN_TOKEN``, else the token file (created when missing)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from daemon.config import TOKEN_ENV
from daemon.errors import ConfigError


def load_admin_token(token_file: Path | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The token admin requests must present, or None when admin endpoints are disabled.

    A missing token file is created with a fresh random token, mode 0600, so a new install is never
    open. An empty file (or ``token_file = ""``) disables the admin endpoints (they answer 503).
    """
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip() or None
    if token_file is None:
        return None
    try:
        return token_file.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"admin.token_file: cannot read {token_file} ({exc})"]) from None
    token = secrets.token_urlsafe(32)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_admin_token(token_file, env)
    except OSError as exc:
        raise ConfigError([f"admin.token_file: cannot create {token_file} ({exc})"]) from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token
