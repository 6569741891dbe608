"""The node's metrics endpoint: prometheus_client's exposition of a snapshot taken on the asyncio loop."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

import pytest

from vpn_packet.metrics import REJECT_REASONS
from vpn_packet.node.metrics_endpoint import MetricsEndpoint, NodeCollector, node_samples


def _snapshot() -> dict[str, Any]:
    dispatcher = {
        "state": "running",
        "workers": 1,
        "busy_workers": 0,
        "accepted": 3,
        "sent": 2,
        "failed": 1,
        "discarded": 0,
        "queued": 0,
        "in_flight": 0,
        "rejected": 0,
        "bytes_sent": 200,
        "rejected_by_reason": dict.fromkeys(REJECT_REASONS, 0),
        "failed_by_reason": {"no_peer": 1},
        "discarded_by_reason": {},
        "workers_created": 1,
        "workers_removed": 0,
        "workers_evicted": 0,
        "workers_recycled": 0,
        "resilience": {},
    }
    receiver = {
        "connections": 2,
        "frames": 5,
        "active_connections": 1,
        "pending": 3,
        "rejected_pending": 4,
        "idle_closed": 6,
        "protocol_errors": {"too_large": 1},
        "refused": {"key_mismatch": 7, "unknown_peer": 8},
        "handshake_failures": {"tls_failed": 9},
    }
    return {
        "id": "node-a",
        "uptime": 1.5,
        "tun": {"packets_read": 4, "backlog": 0, "kernel": {"tx_dropped": 175, "rx_dropped": 0}},
        "node": {"dispatcher": dispatcher, "receiver": receiver, "connects": 1, "connect_failures": 0},
    }


async def _get(address: tuple[str, int], path: str, method: str = "GET") -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(f"{method} {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


def test_samples_reuse_the_dispatcher_builder() -> None:
    samples = {(name, tuple(labels.items())): value for name, _, labels, value in node_samples(_snapshot())}
    assert samples[("vpn_packet_packets_sent_total", ())] == 2  # from metrics.prometheus_samples
    assert samples[("vpn_packet_packets_failed_total", (("reason", "no_peer"),))] == 1
    assert samples[("vpn_packet_receiver_frames_total", ())] == 5
    assert samples[("vpn_packet_receiver_protocol_errors_total", (("reason", "too_large"),))] == 1
    # Connections refused or failed before authentication (issue 10): counted by reason, and the pending ones.
    assert samples[("vpn_packet_receiver_refused_total", (("reason", "key_mismatch"),))] == 7
    assert samples[("vpn_packet_receiver_refused_total", (("reason", "unknown_peer"),))] == 8
    assert samples[("vpn_packet_receiver_handshake_failures_total", (("reason", "tls_failed"),))] == 9
    assert samples[("vpn_packet_receiver_pending_connections", ())] == 3
    assert samples[("vpn_packet_receiver_rejected_pending_total", ())] == 4
    assert samples[("vpn_packet_receiver_idle_closed_total", ())] == 6
    assert samples[("vpn_packet_tun_packets_read_total", ())] == 4
    assert samples[("vpn_packet_uptime_seconds", ())] == 1.5


def test_collector_in_a_registry() -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    registry.register(NodeCollector(_snapshot))
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE vpn_packet_packets_failed_total counter" in text
    assert 'vpn_packet_packets_failed_total{reason="no_peer"} 1.0' in text
    assert "vpn_packet_tun_write_backlog 0.0" in text
    assert "vpn_packet_tun_kernel_tx_dropped_total 175.0" in text
    assert 'vpn_packet_receiver_refused_total{reason="key_mismatch"} 7.0' in text


async def test_endpoint_serves_a_snapshot_taken_on_the_loop() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def snapshot() -> dict[str, Any]:
        threads.append(threading.get_ident())
        return _snapshot()

    endpoint = MetricsEndpoint(snapshot)
    await endpoint.start("127.0.0.1", 0)
    address = endpoint.address
    assert address is not None
    try:
        status, body = await _get(address, "/metrics")
        assert status == "HTTP/1.0 200 OK"
        assert 'vpn_packet_packets_failed_total{reason="no_peer"} 1.0' in body.decode()
        status, body = await _get(address, "/metrics.json")
        assert status == "HTTP/1.0 200 OK"
        assert json.loads(body)["node"]["dispatcher"]["sent"] == 2
        assert (await _get(address, "/metrics.json", "POST"))[0] == "HTTP/1.0 405 Method Not Allowed"
        assert (await _get(address, "/other"))[0] == "HTTP/1.0 404 Not Found"
        assert threads
        assert set(threads) == {loop_thread}  # never read from the server's threads
        assert endpoint.snapshot()["id"] == "node-a"  # on the loop itself: called directly
    finally:
        await endpoint.stop()
    await endpoint.stop()  # idempotent
    assert endpoint.address is None
    with pytest.raises(ConnectionRefusedError):
        await _get(address, "/metrics")


async def test_a_stuck_loop_fails_the_scrape_instead_of_hanging_it() -> None:
    endpoint = MetricsEndpoint(_snapshot, timeout=0.05)
    await endpoint.start("127.0.0.1", 0)
    try:
        outcome: list[BaseException | None] = []

        def scrape() -> None:
            try:
                endpoint.snapshot()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=scrape)
        worker.start()
        worker.join()  # blocks the loop: the snapshot request cannot run
        assert isinstance(outcome[0], TimeoutError)
    finally:
        await endpoint.stop()


async def test_ipv6_listen() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    endpoint = MetricsEndpoint(_snapshot)
    try:
        await endpoint.start("::1", 0)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        address = endpoint.address
        assert address is not None
        assert address[0] == "::1"
        assert (await _get(address, "/metrics"))[0] == "HTTP/1.0 200 OK"
    finally:
        await endpoint.stop()
