"""Who keeps a place among the connections not authenticated yet: the receiver's admission policy.

A connection is *pending* from TCP accept until its hello is judged. Anyone can open one without a key, so
pending connections are bounded, and the rule that picks which one to close when a bound is reached decides
whether an attacker without a key can keep a key-holding peer out. The policy follows what WireGuard's cookie
reply is for: under load, what costs us little and the attacker much decides, and a connection that proves
progress is not the one to go.

Two tiers, each with its own bounds, so that the cheapest attack never displaces a connection that did more:

- **silent**: accepted, not a byte received yet (with TLS the client speaks first, its ClientHello). The
  receiver holds such a connection as a bare socket watched for readability: no transport, no task, no TLS
  buffer; a few hundred bytes and a descriptor. Bounded by `max_silent` in all and `max_silent_per_source`
  per source address; at either bound the *oldest silent* connection (of all, or of that source) is closed
  to make room for the new one. A flood of connections that never send (from one address or many) only
  displaces other silent connections, and a peer's connection leaves this tier within one round trip.
- **handshaking**: bytes arrived (TLS under way, then the challenge and the hello). This is what costs us:
  asyncio's 256 KiB TLS buffer and the TLS key exchange. Bounded by `max_pending` in all and
  `max_pending_per_source` per source address; at either bound the *stalest* connection (of all, or of that
  source) is closed: the one whose last step of progress (entering the tier, finishing TLS, a part of its
  hello) is the oldest. A real peer makes a step every round trip and is authenticated after two or three;
  a connection an attacker holds stops making steps, so it grows stale and goes first. To keep a peer out,
  an attacker would have to make `max_pending` steps of real handshake work (each a TLS key exchange on
  our side and theirs) within one of the peer's round trips.

Neither tier ever refuses a newcomer: a new connection always gets a place by closing an older one of its
tier, so a flood on the peer's own address (its NAT, its host) cannot refuse the peer at accept; it can only
displace its own older connections, which a real peer leaves within a round trip.

Nothing before the hello tells a peer from an attacker with as many addresses, except the address itself:
a connection from a *favoured* address (`favoured(source)`: the receiver favours the addresses of its
configured peers' endpoints) is displaced by the total bounds only when every connection of its tier is
favoured. An attacker cannot take a peer's address with TCP; one that shares it (a NAT) is held to the
per-address bounds, where the oldest or stalest of that address goes first as for everyone.

`Admission` is the bookkeeping only (no sockets, no clock: the order is the order of the calls), so the
policy is tested on its own; the receiver closes what it returns.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["Admission", "Ticket", "Tier"]

_NOBODY: Callable[[str], bool] = lambda _source: False  # noqa: E731 - the default: no address favoured

Tier = Literal["silent", "handshaking"]


@dataclass(eq=False, slots=True)
class Ticket:
    """One pending connection's place: its source address, its tier, and what the receiver attaches to it
    (`handle`: whatever closes it; dropped when the ticket leaves, and by the receiver once it closed an
    evicted one; `accepted`: when, by the receiver's clock). `steps` counts its steps of progress in the
    handshaking tier."""

    source: str
    tier: Tier = "silent"
    handle: object = None
    steps: int = 0
    held: bool = True
    accepted: float = 0.0


class _Queue:
    """Tickets of one tier in eviction order (first: the first to go), in all and per source."""

    __slots__ = ("by_source", "order")

    def __init__(self) -> None:
        self.order: OrderedDict[Ticket, None] = OrderedDict()
        self.by_source: dict[str, OrderedDict[Ticket, None]] = {}

    def __len__(self) -> int:
        return len(self.order)

    def count(self, source: str) -> int:
        held = self.by_source.get(source)
        return len(held) if held is not None else 0

    def add(self, ticket: Ticket) -> None:
        self.order[ticket] = None
        self.by_source.setdefault(ticket.source, OrderedDict())[ticket] = None

    def remove(self, ticket: Ticket) -> bool:
        if ticket not in self.order:
            return False
        del self.order[ticket]
        held = self.by_source[ticket.source]
        del held[ticket]
        if not held:
            del self.by_source[ticket.source]
        return True

    def to_back(self, ticket: Ticket) -> None:
        self.order.move_to_end(ticket)
        self.by_source[ticket.source].move_to_end(ticket)

    def first(self, source: str | None = None) -> Ticket:
        queue = self.order if source is None else self.by_source[source]
        return next(iter(queue))

    def first_not(self, favoured: Callable[[str], bool]) -> Ticket:
        """The first ticket whose source is not favoured; the first of all when every one is."""
        for ticket in self.order:
            if not favoured(ticket.source):
                return ticket
        return self.first()


class Admission:
    """The two tiers of pending connections and their bounds (see the module docstring).

    Each call that adds a connection returns the tickets it displaced; they are out of the tables already,
    and the caller closes them. `leave` is idempotent.
    """

    def __init__(
        self,
        *,
        max_silent: int,
        max_silent_per_source: int,
        max_pending: int,
        max_pending_per_source: int,
        favoured: Callable[[str], bool] = _NOBODY,
    ) -> None:
        for name, value in (
            ("max_silent", max_silent),
            ("max_silent_per_source", max_silent_per_source),
            ("max_pending", max_pending),
            ("max_pending_per_source", max_pending_per_source),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.max_silent = max_silent
        self.max_silent_per_source = max_silent_per_source
        self.max_pending = max_pending
        self.max_pending_per_source = max_pending_per_source
        self.favoured = favoured
        self._silent = _Queue()
        self._handshaking = _Queue()

    # --- what is held ---------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._silent) + len(self._handshaking)

    @property
    def silent(self) -> int:
        return len(self._silent)

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    def held_by(self, source: str) -> tuple[int, int]:
        """(silent, handshaking) connections of `source` now."""
        return self._silent.count(source), self._handshaking.count(source)

    def tickets(self) -> list[Ticket]:
        """Every ticket held, silent ones first, each tier in eviction order."""
        return [*self._silent.order, *self._handshaking.order]

    # --- the moves ------------------------------------------------------------------------------------------

    def arrive(self, source: str) -> tuple[Ticket, list[Ticket]]:
        """A new connection that has sent nothing yet: a silent ticket, and the silent ones it displaced."""
        ticket = Ticket(source)
        evicted = self._make_room(self._silent, source, self.max_silent, self.max_silent_per_source)
        self._silent.add(ticket)
        return ticket, evicted

    def enter(self, source: str) -> tuple[Ticket, list[Ticket]]:
        """A new connection admitted straight to the handshake (plaintext: the server speaks first, so there
        is no silent stage to wait out): a handshaking ticket, and the handshaking ones it displaced."""
        ticket = Ticket(source, "handshaking")
        return ticket, self._enter_handshaking(ticket)

    def start(self, ticket: Ticket) -> list[Ticket]:
        """The first bytes of silent `ticket` arrived: it moves to the back of the handshaking tier; returns
        the handshaking tickets it displaced. A ticket no longer held (displaced meanwhile) stays out."""
        if not ticket.held or ticket.tier != "silent":
            return []
        self._silent.remove(ticket)
        ticket.tier = "handshaking"
        return self._enter_handshaking(ticket)

    def progress(self, ticket: Ticket) -> None:
        """A step of `ticket`'s handshake (TLS done, a part of its hello): it goes last in eviction order."""
        if ticket.held and ticket.tier == "handshaking":
            ticket.steps += 1
            self._handshaking.to_back(ticket)

    def leave(self, ticket: Ticket) -> bool:
        """`ticket` is no longer pending (judged, failed, closed); False when it had left already."""
        if not ticket.held:
            return False
        ticket.held = False
        ticket.handle = None  # it refers back to the ticket: no cycle outlives the connection
        return (self._silent if ticket.tier == "silent" else self._handshaking).remove(ticket)

    def _enter_handshaking(self, ticket: Ticket) -> list[Ticket]:
        evicted = self._make_room(
            self._handshaking, ticket.source, self.max_pending, self.max_pending_per_source
        )
        self._handshaking.add(ticket)
        return evicted

    def next_silent_evictions(self, source: str, n: int) -> list[Ticket]:
        """The first `n` silent tickets that a new silent connection from `source` would displace, in order
        (none below the bounds; favoured ones last). The receiver looks at their sockets first: one whose
        first bytes are already there is not silent any more, and it moves on (`start`) instead of being
        closed."""
        if self._silent.count(source) >= self.max_silent_per_source:
            return list(itertools.islice(self._silent.by_source[source], n))
        if len(self._silent) >= self.max_silent:
            plain = (t for t in self._silent.order if not self.favoured(t.source))
            return list(itertools.islice(dict.fromkeys(itertools.chain(plain, self._silent.order)), n))
        return []

    def oldest_silent(self) -> Ticket | None:
        """The silent ticket that would go first (the receiver closes it when it runs out of descriptors)."""
        return self._silent.first() if self._silent else None

    def _make_room(self, queue: _Queue, source: str, limit: int, per_source: int) -> list[Ticket]:
        evicted: list[Ticket] = []
        if queue.count(source) >= per_source:
            evicted.append(queue.first(source))
        elif len(queue) >= limit:
            evicted.append(queue.first_not(self.favoured))
        for ticket in evicted:
            queue.remove(ticket)
            ticket.held = False
        return evicted
