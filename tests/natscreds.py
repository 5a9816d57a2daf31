"""Decentralized (JWT) NATS auth for tests, made here with `nkeys`: an operator, a system
account, an account with JetStream, and a user's credentials file, as `nsc` would write
them; `server_conf()` is the nats-server config that trusts them (memory resolver)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

_UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
_UNLIMITED |= {"wildcards": True, "conn": -1, "leaf": -1}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _key(prefix: int) -> tuple[bytes, nkeys.KeyPair]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _pub(kp: nkeys.KeyPair) -> str:
    return str(kp.public_key.decode())


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, claims: dict[str, Any]) -> str:
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": _pub(issuer),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    digest = hashlib.sha256(json.dumps(body).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signed = f"{head}.{_b64(json.dumps(body).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


class Operator:
    def __init__(self) -> None:
        _, self._op = _key(nkeys.PREFIX_BYTE_OPERATOR)
        _, self._sys = _key(nkeys.PREFIX_BYTE_ACCOUNT)
        _, self._acc = _key(nkeys.PREFIX_BYTE_ACCOUNT)

    def server_conf(self) -> str:
        op_jwt = _jwt(
            self._op,
            _pub(self._op),
            "test-operator",
            {"type": "operator", "system_account": _pub(self._sys)},
        )
        sys_jwt = _jwt(self._op, _pub(self._sys), "SYS", {"type": "account", "limits": _UNLIMITED})
        acc_claims = {"type": "account", "limits": _UNLIMITED | _JETSTREAM}
        acc_jwt = _jwt(self._op, _pub(self._acc), "oo", acc_claims)
        return (
            f'operator: "{op_jwt}"\nsystem_account: "{_pub(self._sys)}"\nresolver: MEMORY\n'
            f'resolver_preload: {{\n  {_pub(self._acc)}: "{acc_jwt}"\n'
            f'  {_pub(self._sys)}: "{sys_jwt}"\n}}\n'
        )

    def user_creds(self, path: Path, name: str = "oo-ml") -> Path:
        """Write a user's .creds file (JWT issued by the account, and the user's seed)."""
        seed, user = _key(nkeys.PREFIX_BYTE_USER)
        claims = {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}
        user_jwt = _jwt(self._acc, _pub(user), name, claims)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        return path
