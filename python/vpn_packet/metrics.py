"""Plain-data metrics of the dispatcher and its workers, and an optional Prometheus export.

The dispatcher and workers count with integer increments on their own slots (nothing is allocated per
packet); `Dispatcher.metrics()` and `Dispatcher.worker_metrics()` copy those counters into the snapshot
classes defined here, `DispatcherMetrics` and `WorkerMetrics`. This module is plain data and imports nothing
of the package: the dispatcher and the worker import their reason names and snapshot classes from it, never
the other way round (`vpn_packet.worker` re-exports `WorkerMetrics`, where the contract names it).

Accounting (see `DispatcherMetrics`): every packet offered to `dispatch_*` is either *rejected* (never queued,
counted by reason) or *accepted*; an accepted packet is, at any instant, exactly one of *sent* (the peer
acknowledged it; on a stream without acknowledgements, written), *in flight* (written, waiting for the
peer's acknowledgement), *failed* (did not reach the peer: no peer, circuit open, refused, write or stream
error, or lost in flight when its connection ended unacknowledged), *discarded* (dropped without a failed
write: its caller cancelled it, or `stop()` gave up on it) or *queued* (waiting in a worker or being
written right now).

Prometheus: `PrometheusCollector(dispatcher)` is a custom collector for `prometheus_client` (an optional
dependency, imported only when the collector is built); `prometheus_samples()` gives the same numbers as
plain tuples without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DISCARD_REASONS",
    "FAILURE_REASONS",
    "REJECT_REASONS",
    "DispatcherMetrics",
    "PrometheusCollector",
    "WorkerMetrics",
    "prometheus_samples",
]

# The reason names, in one place: the counters are dicts built from these tuples (`dict.fromkeys`), so every
# reason is present from the start (a zero is exported, not a missing series) and a misspelt reason fails with
# a KeyError at the spot that counts it rather than adding a stray key.

#: Why a packet was not accepted by `dispatch_*`.
REJECT_REASONS = ("not_started", "stopped", "queue_full", "worker_limit", "invalid_packet")
#: Why an accepted packet did not reach the peer (`refused`: the peer answered our handshake with a
#: refusal; `lost_in_flight`: written, but the connection ended before the peer acknowledged it).
FAILURE_REASONS = (
    "no_peer",
    "circuit_open",
    "refused",
    "discovery_error",
    "stream_error",
    "write_error",
    "lost_in_flight",
)
#: Why an accepted packet was dropped without a failed write.
DISCARD_REASONS = ("cancelled", "stopped")


@dataclass(frozen=True, slots=True)
class DispatcherMetrics:
    """A snapshot of a dispatcher's totals.

    Identity (checked by `accounting_ok`): ``accepted == sent + failed + discarded + queued + in_flight``,
    where `queued` counts packets waiting in workers and packets being written, and `in_flight` packets
    written and not yet acknowledged by the peer. `rejected` packets were never accepted; the
    per-reason dicts (`rejected_by_reason`, `failed_by_reason`, `discarded_by_reason`) add up to their totals.
    """

    state: str
    workers: int
    busy_workers: int
    accepted: int
    sent: int
    failed: int
    discarded: int
    queued: int
    rejected: int
    in_flight: int
    bytes_sent: int
    rejected_by_reason: Mapping[str, int]
    failed_by_reason: Mapping[str, int]
    discarded_by_reason: Mapping[str, int]
    workers_created: int
    workers_removed: int
    workers_evicted: int
    workers_recycled: int
    resilience: Mapping[str, Any] = field(default_factory=dict)

    @property
    def offered(self) -> int:
        """Every packet handed to `dispatch_*`: accepted plus rejected."""
        return self.accepted + self.rejected

    @property
    def accounting_ok(self) -> bool:
        """Whether accepted = sent + failed + discarded + queued + in_flight and each reason table adds up."""
        return (
            self.accepted == self.sent + self.failed + self.discarded + self.queued + self.in_flight
            and sum(self.rejected_by_reason.values()) == self.rejected
            and sum(self.failed_by_reason.values()) == self.failed
            and sum(self.discarded_by_reason.values()) == self.discarded
        )


@dataclass(slots=True)
class WorkerMetrics:
    """A snapshot of one worker (one sync key): a copy, so changing it changes nothing. (Not frozen: a frozen
    dataclass costs 7x more to build, and `worker_metrics()` builds one per worker.)

    `packet_count`/`byte_count`: packets and bytes sent (acknowledged by the peer, on a stream with acks);
    `error_count`: packets that failed after all retries, or were lost in flight (a retry that later succeeds
    is not an error); `drop_count`: packets rejected because the queue
    was full; `discard_count`: packets dropped unsent (cancelled by their caller, or failed at stop);
    `queue_depth`: packets waiting; `in_flight`: packets being written now; `last_activity`: clock time of the
    last drain (or of creation); `consecutive_failures`: failed batches since the last success;
    `recycle_count`: times the worker dropped its peer and stream after too many consecutive failures.
    """

    sync_key: str
    dest_ip: str
    peer_id: str | None
    packet_count: int
    byte_count: int
    error_count: int
    drop_count: int
    discard_count: int
    queue_depth: int
    in_flight: int
    busy: bool
    last_activity: float
    created_at: float
    consecutive_failures: int
    recycle_count: int


Sample = tuple[str, str, dict[str, str], float]
"""(metric name, kind "counter"/"gauge", labels, value)."""


def prometheus_samples(
    metrics: DispatcherMetrics, workers: Mapping[str, WorkerMetrics] | None = None, prefix: str = "vpn_packet"
) -> Iterator[Sample]:
    """The dispatcher's numbers as Prometheus-style samples; per-worker ones when `workers` is given."""
    p = prefix
    yield f"{p}_packets_accepted_total", "counter", {}, metrics.accepted
    yield f"{p}_packets_sent_total", "counter", {}, metrics.sent
    yield f"{p}_bytes_sent_total", "counter", {}, metrics.bytes_sent
    for reason, n in metrics.rejected_by_reason.items():
        yield f"{p}_packets_rejected_total", "counter", {"reason": reason}, n
    for reason, n in metrics.failed_by_reason.items():
        yield f"{p}_packets_failed_total", "counter", {"reason": reason}, n
    for reason, n in metrics.discarded_by_reason.items():
        yield f"{p}_packets_discarded_total", "counter", {"reason": reason}, n
    yield f"{p}_packets_queued", "gauge", {}, metrics.queued
    yield f"{p}_packets_in_flight", "gauge", {}, metrics.in_flight
    yield f"{p}_workers", "gauge", {}, metrics.workers
    yield f"{p}_workers_busy", "gauge", {}, metrics.busy_workers
    yield f"{p}_workers_created_total", "counter", {}, metrics.workers_created
    yield f"{p}_workers_removed_total", "counter", {}, metrics.workers_removed
    yield f"{p}_workers_evicted_total", "counter", {}, metrics.workers_evicted
    yield f"{p}_workers_recycled_total", "counter", {}, metrics.workers_recycled
    for key, w in (workers or {}).items():
        labels = {"sync_key": key}
        yield f"{p}_worker_packets_total", "counter", labels, w.packet_count
        yield f"{p}_worker_bytes_total", "counter", labels, w.byte_count
        yield f"{p}_worker_errors_total", "counter", labels, w.error_count
        yield f"{p}_worker_drops_total", "counter", labels, w.drop_count
        yield f"{p}_worker_queue_depth", "gauge", labels, w.queue_depth
        yield f"{p}_worker_last_activity", "gauge", labels, w.last_activity


class PrometheusCollector:
    """A `prometheus_client` custom collector for a dispatcher: ``REGISTRY.register(PrometheusCollector(d))``.

    `per_worker=True` adds one series per sync key (mind the cardinality). Needs the optional dependency
    `prometheus_client`; importing this module does not.
    """

    def __init__(self, dispatcher: Any, *, prefix: str = "vpn_packet", per_worker: bool = False) -> None:
        try:
            import prometheus_client.core  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("PrometheusCollector needs the optional dependency prometheus_client") from exc
        self._metrics: Callable[[], DispatcherMetrics] = dispatcher.metrics
        self._workers: Callable[[], Mapping[str, WorkerMetrics]] = dispatcher.worker_metrics
        self._prefix = prefix
        self._per_worker = per_worker

    def describe(self) -> list[Any]:
        """Nothing up front: the label sets depend on the data (prometheus_client then calls `collect`)."""
        return []

    def collect(self) -> Iterator[Any]:
        """One metric family per name, with a sample per label set."""
        from prometheus_client.core import (  # type: ignore[import-not-found, unused-ignore]
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        workers = self._workers() if self._per_worker else None
        families: dict[str, Any] = {}
        for name, kind, labels, value in prometheus_samples(self._metrics(), workers, self._prefix):
            family = families.get(name)
            if family is None:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = cls(name, name.replace("_", " "), labels=sorted(labels))
                families[name] = family
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()
