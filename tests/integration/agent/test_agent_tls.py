"""The agent's link over TLS against a real Mosquitto: each way a handshake goes wrong
is logged naming its cause, with certificates made here by the cryptography package."""

from __future__ import annotations

import logging
import queue
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.errors import ConfigError
from agent.link import Link
from tests.support.broker import Broker, TlsListener
from tests.support.certs import Issued, issue, make_ca
from tests.support.waiting import wait_until


@dataclass
class Pki:
    ca: Issued
    other_ca: Issued
    folder: Path
    # require_certificate + use_identity_as_username, server certificate valid for 127.0.0.1
    strict: Broker
    # a server certificate that expired yesterday
    expired_server: Broker
    # a server certificate naming another host
    misnamed_server: Broker


def tls_broker(workdir: Path, ca: Issued, server: Issued, require_certificate: bool) -> Broker:
    listener = TlsListener(server.cert_file, server.key_file, ca.cert_file, require_certificate)
    return Broker(workdir, tls=listener).start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = make_ca(folder, "ca"), make_ca(folder, "other-ca")
    brokers = [
        tls_broker(folder / "strict", ca, issue(ca, folder, "broker", "broker", server=True), True),
        tls_broker(
            folder / "expired",
            ca,
            issue(ca, folder, "old-broker", "broker", server=True, expired=True),
            False,
        ),
        tls_broker(
            folder / "misnamed",
            ca,
            issue(ca, folder, "misnamed", "broker.example", server=True, hosts=("broker.example",)),
            False,
        ),
    ]
    try:
        yield Pki(ca, other_ca, folder, *brokers)
    finally:
        for broker in brokers:
            broker.stop()


def client_config(
    broker: Broker, ca: Issued, client: Issued | None = None, port: int | None = None
) -> MqttConfig:
    assert broker.tls is not None
    return MqttConfig(
        port=port or broker.tls.port,
        username="cam-1",
        password="unused",
        keepalive_s=10,
        tls_ca_file=str(ca.cert_file),
        tls_cert_file=str(client.cert_file) if client else "",
        tls_key_file=str(client.key_file) if client else "",
    )


@pytest.fixture
def run_link(caplog: pytest.LogCaptureFixture) -> Iterator[list[Link]]:
    caplog.set_level(logging.INFO, logger="agent.link")
    links: list[Link] = []
    yield links
    for link in links:
        link.stop()


def start(links: list[Link], config: MqttConfig, device_id: str = "cam-1") -> Link:
    link = Link(device_id, config, queue.Queue(), "test")
    links.append(link)
    link.start()
    return link


def test_a_device_certificate_logs_in_as_its_common_name(pki: Pki, run_link: list[Link]) -> None:
    cert = issue(pki.ca, pki.folder / "clients", "cam-1", "cam-1")
    link = start(run_link, client_config(pki.strict, pki.ca, cert))
    assert link.wait_connected(20)
    wait_until(lambda: "u'cam-1'" in pki.strict.log_file.read_text(), 10, "the broker's login line")


def case_wrong_ca(pki: Pki) -> tuple[MqttConfig, str]:
    cert = issue(pki.ca, pki.folder / "clients", "cam-1", "cam-1")
    return (
        client_config(pki.strict, pki.other_ca, cert),
        f"the broker's certificate is not signed by the CA in {pki.other_ca.cert_file}",
    )


def case_expired_server(pki: Pki) -> tuple[MqttConfig, str]:
    return client_config(pki.expired_server, pki.ca), "the broker's certificate has expired"


def case_misnamed_server(pki: Pki) -> tuple[MqttConfig, str]:
    return client_config(
        pki.misnamed_server, pki.ca
    ), "the broker's certificate does not name the host '127.0.0.1'"


def case_expired_client(pki: Pki) -> tuple[MqttConfig, str]:
    cert = issue(pki.ca, pki.folder / "expired", "cam-1", "cam-1", expired=True)
    return client_config(pki.strict, pki.ca, cert), f"our client certificate {cert.cert_file} expired at"


def case_client_from_another_ca(pki: Pki) -> tuple[MqttConfig, str]:
    cert = issue(pki.other_ca, pki.folder / "foreign", "cam-1", "cam-1")
    return (
        client_config(pki.strict, pki.ca, cert),
        f"the broker does not trust our client certificate {cert.cert_file}",
    )


def case_no_client_certificate(pki: Pki) -> tuple[MqttConfig, re.Pattern[str]]:
    # TLS 1.3: an alert saying so, or just the connection closed, as the timing falls.
    return client_config(pki.strict, pki.ca), re.compile("(requires|may require) a client certificate")


def case_plain_port(pki: Pki) -> tuple[MqttConfig, str]:
    config = client_config(pki.strict, pki.ca, port=pki.strict.port)
    return config, "the broker reset the connection during the TLS handshake: is the port its plain listener?"


@pytest.mark.parametrize(
    "case",
    [
        case_wrong_ca,
        case_expired_server,
        case_misnamed_server,
        case_expired_client,
        case_client_from_another_ca,
        case_no_client_certificate,
        case_plain_port,
    ],
)
def test_a_refused_handshake_is_logged_naming_its_cause_and_retried(
    pki: Pki, run_link: list[Link], caplog: pytest.LogCaptureFixture, case: object
) -> None:
    config, cause = case(pki)  # type: ignore[operator]
    link = start(run_link, config)

    def attempts() -> int:
        pattern = cause if isinstance(cause, re.Pattern) else re.compile(re.escape(cause))
        return sum(bool(pattern.search(r.getMessage())) for r in caplog.records if r.name == "agent.link")

    wait_until(lambda: attempts() >= 2, 30, f"two attempts naming {cause!r}; log:\n{caplog.text}")
    assert not link.connected


def test_unusable_tls_files_are_a_config_error_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    config = client_config(pki.strict, pki.ca)
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"CA file {not_pem}: cannot load"):
        Link("cam-1", replace(config, tls_ca_file=str(not_pem)), queue.Queue(), "test")
    one = issue(pki.ca, tmp_path / "one", "cam-1", "cam-1")
    two = issue(pki.ca, tmp_path / "two", "cam-1", "cam-1")
    mismatched = replace(config, tls_cert_file=str(one.cert_file), tls_key_file=str(two.key_file))
    with pytest.raises(ConfigError, match="the key does not belong to the certificate"):
        Link("cam-1", mismatched, queue.Queue(), "test")


def test_a_client_certificate_near_its_end_is_announced_at_start(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.tls")
    one_day = issue(pki.ca, pki.folder / "short", "cam-1", "cam-1")
    Link("cam-1", client_config(pki.strict, pki.ca, one_day), queue.Queue(), "test")
    assert f"our client certificate {one_day.cert_file} expires at" in caplog.text
    assert "(in 0 days): have a new one issued" in caplog.text
