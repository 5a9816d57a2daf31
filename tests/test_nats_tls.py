"""Ingest over a NATS connection with TLS (server certificate checked, client certificate
presented) and an authorization block, against a real nats-server started with them."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oo.scoring.v1 import scoring_pb2 as pb
from oo_ml import config as config_mod
from oo_ml.ingest.runner import connection_options
from tests.certs import CA
from tests.conftest import ServerFactory
from tests.helpers import assert_eventually
from tests.natscreds import Operator
from tests.natsfix import COMPLETED, configured_nats, feedback

USER, PASSWORD = "oo-ml", "s3cret-pass"


@dataclass
class SecureNats:
    port: int
    ca_file: Path
    other_ca_file: Path
    client_cert: Path
    client_key: Path

    def url(self, password: str = PASSWORD) -> str:
        return f"nats://{USER}:{password}@127.0.0.1:{self.port}"

    def env(self, ca_file: Path | None = None) -> dict[str, str]:
        return {
            "OO_INGEST": "1",
            "OO_NATS_URL": self.url(),
            "OO_NATS_TLS_CA_FILE": str(ca_file or self.ca_file),
            "OO_NATS_TLS_CERT_FILE": str(self.client_cert),
            "OO_NATS_TLS_KEY_FILE": str(self.client_key),
        }

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


@pytest.fixture
async def secure_nats(tmp_path: Path) -> AsyncIterator[SecureNats]:
    d = tmp_path / "pki"
    ca, other = CA("nats-ca"), CA("other-ca")
    server_cert, server_key = ca.issue("nats", server=True)[0].write(d, "nats")
    client_cert, client_key = ca.issue("oo-ml", server=False)[0].write(d, "client")
    conf = f"""
tls {{
  cert_file: "{server_cert}"
  key_file: "{server_key}"
  ca_file: "{ca.write(d)}"
  verify: true
  timeout: 2
}}
authorization {{
  user: "{USER}"
  password: "{PASSWORD}"
}}
"""
    async with configured_nats(tmp_path / "nats", conf) as port:
        yield SecureNats(port, d / "nats-ca.crt", other.write(d), client_cert, client_key)


async def score_feedback_applied(
    server_factory: ServerFactory,
    env: dict[str, str],
    publisher_url: str,
    **publisher_options: object,
) -> None:
    """Start oo-ml with env, wait for ingest, publish a feedback event for a Score's
    decision from a separate client, and see the reward and the counters in Stats."""
    srv = await server_factory(env)
    health = health_pb2_grpc.HealthStub(srv.channel)

    async def ingest_serving() -> None:
        resp = await health.Check(health_pb2.HealthCheckRequest(service="oo.ingest"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    await assert_eventually(ingest_serving)
    request = pb.ScoreRequest(
        user_id="u1", candidates=[pb.Candidate(tip_id=f"tip-{a}", arm=a) for a in ("a", "b")]
    )
    decision = (await srv.stub.Score(request)).decision_id
    nc = await nats.connect(publisher_url, **publisher_options)  # type: ignore[arg-type]
    try:
        await nc.jetstream().publish(
            "feedback.tip", feedback("fb-1", decision, COMPLETED).SerializeToString()
        )
    finally:
        await nc.close()

    async def applied() -> None:
        assert (await srv.stub.Stats(pb.StatsRequest(user_id="u1"))).rewarded == 1
        server = await srv.stub.Stats(pb.StatsRequest())
        # The serve signal oo-ml published over TLS comes back, with the feedback.
        assert server.ingest["applied"] >= 2 and server.ingest["published"] == 1

    await assert_eventually(applied)


async def test_ingest_over_tls_with_a_client_certificate_and_a_password(
    server_factory: ServerFactory, secure_nats: SecureNats
) -> None:
    await score_feedback_applied(
        server_factory,
        secure_nats.env(),
        secure_nats.url(),
        tls=secure_nats.client_context(),
    )


async def test_ingest_over_tls_with_a_creds_file_in_operator_mode(
    server_factory: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "pki"
    ca = CA("nats-ca")
    server_cert, server_key = ca.issue("nats", server=True)[0].write(d, "nats")
    operator = Operator()
    conf = f"""
tls {{
  cert_file: "{server_cert}"
  key_file: "{server_key}"
}}
{operator.server_conf()}
"""
    creds = operator.user_creds(tmp_path / "creds" / "oo-ml.creds")
    publisher_creds = operator.user_creds(tmp_path / "creds" / "publisher.creds", "publisher")
    ca_file = ca.write(d)
    async with configured_nats(tmp_path / "nats", conf) as port:
        url = f"nats://127.0.0.1:{port}"
        env = {
            "OO_INGEST": "1",
            "OO_NATS_URL": url,
            "OO_NATS_CREDS_FILE": str(creds),
            "OO_NATS_TLS_CA_FILE": str(ca_file),
        }
        await score_feedback_applied(
            server_factory,
            env,
            url,
            user_credentials=str(publisher_creds),
            tls=ssl.create_default_context(cafile=str(ca_file)),
        )
        # A user of another operator is refused, and the reason is logged.
        caplog.set_level(logging.WARNING, logger="oo_ml.ingest.runner")
        stranger = Operator().user_creds(tmp_path / "creds" / "stranger.creds")
        srv = await server_factory({**env, "OO_NATS_CREDS_FILE": str(stranger)})
        resp = await health_pb2_grpc.HealthStub(srv.channel).Check(
            health_pb2.HealthCheckRequest(service="oo.ingest")
        )
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "authorization violation" in caplog.text.lower(), caplog.text


@pytest.mark.parametrize("problem", ["wrong CA", "no client certificate", "wrong password"])
async def test_a_nats_tls_or_auth_failure_is_logged_and_ingest_not_serving(
    server_factory: ServerFactory,
    secure_nats: SecureNats,
    caplog: pytest.LogCaptureFixture,
    problem: str,
) -> None:
    env = secure_nats.env()
    expected = {
        "wrong CA": "CERTIFICATE_VERIFY_FAILED",
        "no client certificate": "certificate required",
        "wrong password": "authorization violation",
    }[problem]
    if problem == "wrong CA":
        env["OO_NATS_TLS_CA_FILE"] = str(secure_nats.other_ca_file)
    elif problem == "no client certificate":
        del env["OO_NATS_TLS_CERT_FILE"], env["OO_NATS_TLS_KEY_FILE"]
    else:
        env["OO_NATS_URL"] = secure_nats.url("wrong")
    caplog.set_level(logging.WARNING, logger="oo_ml.ingest.runner")
    srv = await server_factory(env)  # the start goes on without NATS: Score is unaffected
    resp = await health_pb2_grpc.HealthStub(srv.channel).Check(
        health_pb2.HealthCheckRequest(service="oo.ingest")
    )
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    errors = [r.getMessage() for r in caplog.records if "NATS connection error" in r.getMessage()]
    assert errors, caplog.text
    assert any(expected.lower() in e.lower() for e in errors), errors
    assert any("is not reachable yet" in r.getMessage() for r in caplog.records)


def test_connection_options_carry_credentials_and_tls(tmp_path: Path) -> None:
    ca = CA("nats-ca")
    ca_file = ca.write(tmp_path)
    cert, key = ca.issue("oo-ml", server=False)[0].write(tmp_path, "client")
    creds = tmp_path / "user.creds"
    settings = config_mod.load(
        env={
            "OO_NATS_URL": "nats://nats.internal:4222",
            "OO_NATS_CREDS_FILE": str(creds),
            "OO_NATS_TLS_CA_FILE": str(ca_file),
            "OO_NATS_TLS_CERT_FILE": str(cert),
            "OO_NATS_TLS_KEY_FILE": str(key),
        }
    ).ingest
    options = connection_options(settings)
    assert options["user_credentials"] == str(creds)
    ctx = options["tls"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.get_ca_certs()[0]["subject"] == ((("commonName", "nats-ca"),),)
    # Nothing set: a plain connection, as before.
    plain = config_mod.load(env={"OO_NATS_URL": "nats://127.0.0.1:4222"}).ingest
    assert connection_options(plain) == {}
