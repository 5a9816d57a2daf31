"""TLS of the gRPC port, and the certificates reloaded without a restart.

    creds = server_credentials(config.server)   # None when TLS is off
    port = server.add_secure_port(address, creds)

The credentials are grpc's dynamic SSL credentials: grpc calls `CertificateFiles.fetch`
before every new TLS handshake, and it answers a new certificate configuration when the
certificate, key or client CA file changed since the last load (by size, mtime or inode,
then by content), else None (keep the current one). A changed set is loaded only if the key
matches the certificate, so a half-written rotation (the certificate copied, the key not
yet) keeps the old pair in service and is logged; it is picked up once both are in place.
Connections already open keep the certificate they were made with.

The protected mode (`exposure_problem`: a non-loopback address needs TLS and a token) is in
`app/exposure.py`, which imports no grpc.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from oo_ml.config import ServerConfig

log = logging.getLogger(__name__)

_Stamp = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class _Loaded:
    stamp: _Stamp
    cert: bytes
    key: bytes
    client_ca: bytes | None

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


class CertificateFiles:
    """The certificate, key and optional client CA files, read again when they change."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.client_ca_file = client_ca_file
        self.reloads = 0
        """How many times a changed set was loaded after the first."""
        self._lock = threading.Lock()  # grpc may call fetch from more than one thread
        self._current = self._load()  # a bad set at start-up fails the start
        self._rejected: _Stamp | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        files = (self.cert_file, self.key_file)
        return (*files, self.client_ca_file) if self.client_ca_file is not None else files

    def _stamp(self) -> _Stamp:
        out = []
        for p in self.paths:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns, st.st_ino))
        return tuple(out)

    def _load(self) -> _Loaded:
        """Read and check the files; ValueError naming the file and the problem."""
        try:
            stamp = self._stamp()
            cert = self.cert_file.read_bytes()
            key = self.key_file.read_bytes()
            client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        except OSError as e:
            raise ValueError(f"cannot read a TLS file: {e}") from e
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(
                f"OO_TLS_CERT_FILE {self.cert_file} and OO_TLS_KEY_FILE {self.key_file}"
                f" are not a usable certificate and key: {e}"
            ) from e
        if self.client_ca_file is not None:
            try:
                ssl.create_default_context(cafile=str(self.client_ca_file))
            except (ssl.SSLError, OSError) as e:
                raise ValueError(
                    f"OO_TLS_CLIENT_CA_FILE {self.client_ca_file} is not a PEM CA bundle: {e}"
                ) from e
        # A file replaced while we read it: take it on the next handshake instead.
        if self._stamp() != stamp:
            raise ValueError("the TLS files changed while they were read")
        return _Loaded(stamp, cert, key, client_ca)

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._current.configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate_configuration_fetcher: a new configuration, or None to keep
        the current one. Never raises (grpc would refuse the handshake)."""
        try:
            with self._lock:
                stamp = self._stamp()
                if stamp in (self._current.stamp, self._rejected):
                    return None
                try:
                    loaded = self._load()
                except ValueError as e:
                    self._rejected = stamp
                    log.warning("TLS files changed but cannot be used yet (%s); keeping the old", e)
                    return None
                same = (loaded.cert, loaded.key, loaded.client_ca) == (
                    self._current.cert,
                    self._current.key,
                    self._current.client_ca,
                )
                self._current = loaded
                if same:  # touched, not changed
                    return None
                self.reloads += 1
                log.info("TLS certificate reloaded from %s", self.cert_file)
                return loaded.configuration()
        except Exception as e:  # e.g. a file missing mid-rotation: keep serving the old one
            log.warning("checking the TLS files failed (%s); keeping the current certificate", e)
            return None


def server_credentials(
    cfg: ServerConfig,
) -> tuple[grpc.ServerCredentials, CertificateFiles] | None:
    """Credentials for `add_secure_port` and the files behind them; None when TLS is off."""
    if cfg.tls_cert_file is None or cfg.tls_key_file is None:
        return None
    files = CertificateFiles(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
    creds = grpc.dynamic_ssl_server_credentials(
        files.initial(),
        files.fetch,  # type: ignore[arg-type]  # the stubs omit None, grpc's "no change"
        require_client_authentication=cfg.tls_client_ca_file is not None,
    )
    return creds, files
