"""The protected mode of `oo-ml serve`: a non-loopback address needs TLS and a token.

No grpc here: the parent of `oo-ml serve --workers N` runs this check and never imports
grpc (ADR 0020).
"""

from __future__ import annotations

import ipaddress

from oo_ml.config import ServerConfig


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) and localhost; anything else may be reachable."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def exposure_problem(cfg: ServerConfig) -> str | None:
    """Why serving on cfg.host would be unsafe, or None: a non-loopback address needs TLS
    and OO_AUTH_TOKEN unless OO_INSECURE is set."""
    if cfg.insecure or is_loopback(cfg.host):
        return None
    missing = []
    if not cfg.tls:
        missing.append("TLS (set OO_TLS_CERT_FILE and OO_TLS_KEY_FILE)")
    if not cfg.auth_token:
        missing.append("a token (set OO_AUTH_TOKEN)")
    if not missing:
        return None
    return (
        f"refusing to serve on {cfg.host!r}, which is not a loopback address, without "
        + " and without ".join(missing)
        + "; pass --insecure (or OO_INSECURE=1) to serve anyway"
    )
