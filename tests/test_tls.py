"""TLS and mTLS on the gRPC port, certificate reload without a restart, and the protected
mode of `oo-ml serve` on a non-loopback address. Real servers on port 0, a PKI made here."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oo.scoring.v1 import scoring_pb2 as pb
from oo.scoring.v1 import scoring_pb2_grpc
from oo_ml import config as config_mod
from oo_ml.app.exposure import exposure_problem, is_loopback
from oo_ml.app.supervisor import App
from tests.certs import CA, Pem
from tests.conftest import ServerFactory, oo_ml_bin
from tests.helpers import ServerProcess


@dataclass
class Pki:
    dir: Path
    ca: CA
    other_ca: CA
    ca_file: Path
    other_ca_file: Path
    server: Pem
    client: Pem
    other_client: Pem

    @property
    def cert_file(self) -> Path:
        return self.dir / "server.crt"

    @property
    def key_file(self) -> Path:
        return self.dir / "server.key"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    ca, other = CA("oo-test-ca"), CA("other-ca")
    server, _ = ca.issue("oo-ml", server=True)
    server.write(d, "server")
    client, _ = ca.issue("client", server=False)
    other_client, _ = other.issue("intruder", server=False)
    return Pki(d, ca, other, ca.write(d), other.write(d), server, client, other_client)


def tls_env(pki: Pki, mtls: bool = False) -> dict[str, str]:
    env = {"OO_TLS_CERT_FILE": str(pki.cert_file), "OO_TLS_KEY_FILE": str(pki.key_file)}
    if mtls:
        env["OO_TLS_CLIENT_CA_FILE"] = str(pki.ca_file)
    return env


async def call(port: int, creds: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """Health.Check and Stats over a fresh channel; OK or the failing call's code."""
    target = f"127.0.0.1:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if creds is None
        else grpc.aio.secure_channel(target, creds)
    )
    try:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        await scoring_pb2_grpc.ScoringServiceStub(channel).Stats(pb.StatsRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        await channel.close()


def trusting(ca: CA, client: Pem | None = None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(ca.cert_pem)
    return grpc.ssl_channel_credentials(ca.cert_pem, client.key, client.cert)


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename over: how a rotation should land (never half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(
    server_factory: ServerFactory, pki: Pki
) -> None:
    srv = await server_factory(tls_env(pki))
    port = srv.app.port
    assert await call(port, trusting(pki.ca)) == grpc.StatusCode.OK
    assert await call(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext client
    # A client that does not trust the server's CA refuses the server.
    assert await call(port, trusting(pki.other_ca)) == grpc.StatusCode.UNAVAILABLE
    # Without a client CA, client certificates are not asked for.
    assert await call(port, trusting(pki.ca, pki.client)) == grpc.StatusCode.OK


async def test_mtls_requires_a_client_certificate_from_the_client_ca(
    server_factory: ServerFactory, pki: Pki
) -> None:
    srv = await server_factory(tls_env(pki, mtls=True))
    port = srv.app.port
    assert await call(port, trusting(pki.ca)) == grpc.StatusCode.UNAVAILABLE  # no certificate
    assert await call(port, trusting(pki.ca, pki.client)) == grpc.StatusCode.OK
    assert await call(port, trusting(pki.ca, pki.other_client)) == grpc.StatusCode.UNAVAILABLE
    assert await call(port, None) == grpc.StatusCode.UNAVAILABLE


async def test_certificate_files_replaced_are_served_to_new_connections_without_restart(
    server_factory: ServerFactory, pki: Pki
) -> None:
    srv = await server_factory(tls_env(pki))
    port = srv.app.port
    assert await call(port, trusting(pki.ca)) == grpc.StatusCode.OK
    # An open channel made with the old certificate.
    kept = grpc.aio.secure_channel(f"127.0.0.1:{port}", trusting(pki.ca))
    kept_health = health_pb2_grpc.HealthStub(kept)
    await kept_health.Check(health_pb2.HealthCheckRequest(), timeout=5)

    new_ca = CA("rotated-ca")
    new_pair, _ = new_ca.issue("oo-ml", server=True)
    replace_file(pki.cert_file, new_pair.cert)
    replace_file(pki.key_file, new_pair.key)

    assert await call(port, trusting(new_ca)) == grpc.StatusCode.OK
    assert await call(port, trusting(pki.ca)) == grpc.StatusCode.UNAVAILABLE
    assert srv.app.tls_files is not None and srv.app.tls_files.reloads == 1
    # The connection made before keeps working on its own handshake.
    resp = await kept_health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    await kept.close()


async def test_half_rotated_files_keep_the_old_pair_until_both_are_in_place(
    server_factory: ServerFactory, pki: Pki
) -> None:
    srv = await server_factory(tls_env(pki))
    port = srv.app.port
    new_ca = CA("rotated-ca")
    new_pair, _ = new_ca.issue("oo-ml", server=True)
    replace_file(pki.cert_file, new_pair.cert)  # the key is still the old one
    assert await call(port, trusting(pki.ca)) == grpc.StatusCode.OK
    assert await call(port, trusting(new_ca)) == grpc.StatusCode.UNAVAILABLE
    replace_file(pki.key_file, new_pair.key)
    assert await call(port, trusting(new_ca)) == grpc.StatusCode.OK


async def test_mtls_client_ca_file_is_reloaded_too(server_factory: ServerFactory, pki: Pki) -> None:
    srv = await server_factory(tls_env(pki, mtls=True))
    port = srv.app.port
    assert await call(port, trusting(pki.ca, pki.other_client)) == grpc.StatusCode.UNAVAILABLE
    bundle = pki.ca.cert_pem + pki.other_ca.cert_pem  # now trust both client CAs
    replace_file(pki.ca_file, bundle)
    assert await call(port, trusting(pki.ca, pki.other_client)) == grpc.StatusCode.OK
    assert await call(port, trusting(pki.ca, pki.client)) == grpc.StatusCode.OK


async def test_unusable_certificate_files_fail_the_start(tmp_path: Path, pki: Pki) -> None:
    other_key = pki.dir / "other.key"
    other_key.write_bytes(pki.ca.issue("x", server=True)[0].key)
    base = {"OO_DATA_DIR": str(tmp_path / "d"), "OO_PORT": "0", "OO_INGEST": "0"}
    cases = {
        "not a usable certificate and key": {
            "OO_TLS_CERT_FILE": str(pki.cert_file),
            "OO_TLS_KEY_FILE": str(other_key),
        },
        "cannot read a TLS file": {
            "OO_TLS_CERT_FILE": str(pki.dir / "missing.crt"),
            "OO_TLS_KEY_FILE": str(pki.key_file),
        },
    }
    for expected, env in cases.items():
        app = App(config_mod.load(env={**base, **env}))
        with pytest.raises(ValueError, match=expected):
            await app.start()
        await app.stop()


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValueError, match="OO_TLS_CERT_FILE and OO_TLS_KEY_FILE go together"):
        config_mod.load(env={"OO_TLS_CERT_FILE": "/x.crt"})
    with pytest.raises(ValueError, match="OO_TLS_CLIENT_CA_FILE needs TLS"):
        config_mod.load(env={"OO_TLS_CLIENT_CA_FILE": "/ca.crt"})
    with pytest.raises(ValueError, match="OO_NATS_TLS_CERT_FILE and OO_NATS_TLS_KEY_FILE"):
        config_mod.load(env={"OO_NATS_URL": "nats://h:4222", "OO_NATS_TLS_KEY_FILE": "/k"})
    with pytest.raises(ValueError, match="need OO_NATS_URL"):
        config_mod.load(env={"OO_NATS_CREDS_FILE": "/u.creds"})
    cfg = config_mod.load(env={"OO_TLS_CERT_FILE": "/x.crt", "OO_TLS_KEY_FILE": "/x.key"})
    assert cfg.server.tls and cfg.server.tls_cert_file == Path("/x.crt")


# -- protected mode -----------------------------------------------------------------------


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "example.com", "localhost.example.com"):
        assert not is_loopback(host), host


def test_exposure_needs_tls_and_a_token_unless_insecure() -> None:
    def problem(**env: str) -> str | None:
        return exposure_problem(config_mod.load(env=env).server)

    assert problem(OO_HOST="127.0.0.1") is None
    both = problem(OO_HOST="0.0.0.0")
    assert both is not None and "OO_TLS_CERT_FILE" in both and "OO_AUTH_TOKEN" in both
    tls_only = problem(OO_HOST="0.0.0.0", OO_TLS_CERT_FILE="/c", OO_TLS_KEY_FILE="/k")
    assert tls_only is not None and "OO_AUTH_TOKEN" in tls_only and "OO_TLS" not in tls_only
    token_only = problem(OO_HOST="0.0.0.0", OO_AUTH_TOKEN="t")
    assert token_only is not None and "OO_TLS_CERT_FILE" in token_only
    assert "OO_AUTH_TOKEN" not in token_only.split("; pass")[0]
    assert (
        problem(OO_HOST="0.0.0.0", OO_AUTH_TOKEN="t", OO_TLS_CERT_FILE="/c", OO_TLS_KEY_FILE="/k")
        is None
    )
    assert problem(OO_HOST="0.0.0.0", OO_INSECURE="1") is None


def test_serve_refuses_a_non_loopback_address_without_tls_or_token(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    proc = subprocess.run(
        [oo_ml_bin(), "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path)],
        env=clean_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve on '0.0.0.0'" in proc.stderr
    assert "set OO_TLS_CERT_FILE and OO_TLS_KEY_FILE" in proc.stderr
    assert "set OO_AUTH_TOKEN" in proc.stderr
    assert "--insecure" in proc.stderr
    assert "listening" not in proc.stdout
    assert not (tmp_path / "oo-ml.db").exists()  # refused before anything was opened


def test_serve_insecure_starts_on_a_non_loopback_address(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    for extra, env in (
        (["--insecure"], clean_env),
        ([], {**clean_env, "OO_INSECURE": "1"}),
    ):
        server = ServerProcess(
            [
                oo_ml_bin(),
                "serve",
                "--host",
                "0.0.0.0",
                "--port",
                "0",
                "--data-dir",
                str(tmp_path),
                "--no-ingest",
                *extra,
            ],
            env,
        )
        try:
            assert server.address.startswith("0.0.0.0:")
            assert server.stop(signal.SIGTERM) == 0
        finally:
            err = server.kill()
        assert "OO_INSECURE is set" in err
