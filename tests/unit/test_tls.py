"""TLS settings, and a real handshake: a client with the CA trusts the server, one without does
not."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from controller.settings import ControllerSettings
from fleetcore.tls import client_ssl_context
from gateway.settings import GatewaySettings
from tests.certs import TLSFiles, make_tls_files
from webui.settings import WebUISettings
from worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_a_server_needs_both_certificate_and_key(tls: TLSFiles) -> None:
    settings = ControllerSettings(ssl_certfile=tls.cert, ssl_keyfile=tls.key)
    assert settings.scheme == "https"
    assert settings.uvicorn_ssl() == {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    assert ControllerSettings().uvicorn_ssl() == {}
    with pytest.raises(ValidationError, match="both --ssl-certfile and --ssl-keyfile"):
        ControllerSettings(ssl_certfile=tls.cert)
    with pytest.raises(ValidationError, match="does not exist"):
        ControllerSettings(ssl_certfile=tls.cert, ssl_keyfile=tls.key.with_name("nope.pem"))


def test_each_service_takes_its_own_certificate_and_the_shared_ca(
    tls: TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_GATEWAY_SSL_CERTFILE", str(tls.cert))
    monkeypatch.setenv("FLEET_GATEWAY_SSL_KEYFILE", str(tls.key))
    monkeypatch.setenv("FLEET_SSL_CA_FILE", str(tls.ca))
    assert GatewaySettings().tls and not ControllerSettings().tls
    for settings in (GatewaySettings(), WorkerSettings(model="m"), WebUISettings()):
        assert settings.ssl_ca_file == tls.ca
    flags = WorkerSettings.from_cli(["--model", "m", "--ssl-ca-file", str(tls.cert)])
    assert flags.ssl_ca_file == tls.cert  # the flag wins over the variable
    with pytest.raises(ValidationError, match="CA file"):
        WebUISettings(ssl_ca_file=Path("/nonexistent/ca.pem"))


@pytest.fixture
def tls_server(tls: TLSFiles) -> Iterator[int]:
    """A TLS server on a free port that accepts connections until the test ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.sendall(b"hello")
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused our certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _handshake(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as conn:
            return conn.recv(5)


def test_a_client_with_the_ca_trusts_the_server(tls: TLSFiles, tls_server: int) -> None:
    assert _handshake(tls_server, client_ssl_context(tls.ca)) == b"hello"


def test_a_client_without_the_ca_refuses_it(tls_server: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_server, client_ssl_context(None))


def test_the_certificate_must_name_the_host(tls: TLSFiles, tls_server: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(tls_server, client_ssl_context(tls.ca), host="fleet.example.com")
