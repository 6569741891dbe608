"""A wrong public key is one clear WARNING line on each side, naming the peer, the reason and what to do
(issue 22, operator point 5: the side that dialled logged a Python tuple, the other only `closed_early`).

Real sockets and TLS: node-a dials node-b's receiver with a `TcpStreamService`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from vpn_packet.errors import HandshakeRefusedError, NetworkError
from vpn_packet.testutil.fixtures import wait_until
from vpn_packet.testutil.keys import identities
from vpn_packet.testutil.sinks import RecordingSink
from vpn_packet.transport.discovery import Peer, StaticPeerDiscovery
from vpn_packet.transport.handshake import Security
from vpn_packet.transport.identity import NodeIdentity
from vpn_packet.transport.receiver import Receiver
from vpn_packet.transport.tcp import TcpStreamService

TCP = "vpn_packet.transport.tcp"
RECEIVER = "vpn_packet.transport.receiver"


@pytest.fixture
def ids(tmp_path: Path) -> dict[str, NodeIdentity]:
    return identities(tmp_path, "node-a", "node-b", "stranger")


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


async def dial(receiver: Receiver, security: Security) -> None:
    service = TcpStreamService(
        StaticPeerDiscovery([Peer("node-b", f"127.0.0.1:{receiver.address[1]}", ["10.8.0.1/32"])]), security
    )
    await service.create_stream("node-b")


def node_b_receiver(ids: dict[str, NodeIdentity], key_of_a: bytes) -> Receiver:
    security = Security.with_keys(ids["node-b"], {"node-a": key_of_a})
    # node-a's endpoint is on the address it connects from: the receiver can name it.
    discovery = StaticPeerDiscovery([Peer("node-a", "127.0.0.1:7001", ["10.8.0.2/32"])])
    return Receiver(discovery, RecordingSink(), security=security)


async def test_the_dialler_has_a_wrong_key_for_the_server(
    ids: dict[str, NodeIdentity], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = Security.with_keys(ids["node-a"], {"node-b": ids["stranger"].public_key_bytes})
    async with node_b_receiver(ids, ids["node-a"].public_key_bytes) as receiver:
        with pytest.raises(NetworkError):
            await dial(receiver, a)
        # The native client refuses node-b's key inside TLS, with an alert node-b counts and explains.
        await wait_until(lambda: receiver.metrics().handshake_failures.get("tls_failed") == 1)
    [dialler] = lines(caplog, TCP)
    assert dialler.startswith("cannot open a stream to node-b at 127.0.0.1:")
    assert f"node-b presented key {ids['node-b'].public_key}" in dialler
    assert f"its configured public_key is {ids['stranger'].public_key}" in dialler
    assert (
        "put its new public key (`vpn-packet pubkey` of its key file) as public_key of peer node-b" in dialler
    )
    assert "('" not in dialler  # not a tuple's repr
    [server] = lines(caplog, RECEIVER)
    assert "refused our certificate in TLS" in server
    assert "peer node-a (configured at that address)" in server
    assert (
        f"put our public key {ids['node-b'].public_key} as public_key of peer node-b in its config" in server
    )


async def test_the_server_has_a_wrong_key_for_the_dialler(
    ids: dict[str, NodeIdentity], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = Security.with_keys(ids["node-a"], {"node-b": ids["node-b"].public_key_bytes})
    async with node_b_receiver(ids, ids["stranger"].public_key_bytes) as receiver:
        with pytest.raises(HandshakeRefusedError) as refused:
            await dial(receiver, a)
        assert refused.value.reason == "key_mismatch"
    [dialler] = lines(caplog, TCP)
    assert dialler.startswith("node-b refused us: our key is not the one it has for node-a")
    assert (
        f"put our public key {ids['node-a'].public_key} as public_key of peer node-a in node-b's config"
        in (dialler)
    )
    [server] = lines(caplog, RECEIVER)
    assert server.startswith("receiver: refused 127.0.0.1 (calls itself 'node-a'): key_mismatch")
    assert "put its new public key (`vpn-packet pubkey` of its key file) as its public_key" in server
