"""A node's life in the mesh: publish its entry under a lease, watch the prefix, apply what changes.

`Registry` runs beside a node (issue 21 items 2 and 4):

- at start it reads the state file (the last entries seen and the revocations held) and applies them, so a
  node starts even while etcd is down; its own membership is refused if a held revocation covers it;
- it connects to etcd (retrying with backoff), reads the prefix and applies it, then grants a lease of `ttl`
  seconds and puts its entry at `PREFIX/members/ID` under it (its membership, endpoint and a sequence
  number, signed by its key), then watches the prefix from the revision after the read: every event goes
  through the `MemberTable` and what it changes goes to `apply`, the node's one add/update/remove path;
- it renews the lease every third of the TTL. If etcd is lost, the tunnels keep working and the membership
  stays as it was (frozen), with one WARNING; when etcd is back it re-publishes and re-reads the prefix
  (what left meanwhile is removed);
- a membership that expires while running is removed (a timer on the next expiry);
- it stops by revoking its lease: the others drop it at once instead of after the TTL.

`status()` is what `vpn-packet status` and the metrics show: connected or not, the last revision seen, the
entries refused by reason, overlap alarms, members applied.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vpn_packet.errors import MembershipError
from vpn_packet.mesh.config import DiscoveryConfig
from vpn_packet.mesh.members import MEMBERS_DIR, MemberTable, PeerSetChange
from vpn_packet.mesh.membership import sign_entry, verify_entry, verify_revocation
from vpn_packet.ratelimit import LogLimiter
from vpn_packet.transport.identity import NodeIdentity
from vpn_packet.tuning import LOG_INTERVAL, RECONNECT_BACKOFF, RECONNECT_BACKOFF_MAX

__all__ = ["Registry", "load_state"]

_log = logging.getLogger("vpn_packet.mesh")

#: How often the state file is written at most (seconds): a burst of joins is one write.
STATE_WRITE_INTERVAL = 1.0
#: The longest a close of the etcd client or a watch may take (seconds).
CLOSE_TIMEOUT = 2.0


def load_state(path: Path) -> tuple[list[bytes], list[bytes], int]:
    """The entries, revocations and sequence in a state file; empty when there is none. A file that does
    not read is logged and ignored (the store has the truth; the state only bridges an outage)."""
    try:
        data = json.loads(path.read_text())
        entries = [base64.b64decode(item, validate=True) for item in data["entries"]]
        revocations = [base64.b64decode(item, validate=True) for item in data["revocations"]]
        sequence = int(data["sequence"])
    except FileNotFoundError:
        return [], [], 0
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _log.warning("discovery: state file %s unreadable, starting without it: %s", path, exc)
        return [], [], 0
    return entries, revocations, sequence


class Registry:
    """This node's membership in etcd (see the module docstring). `apply` is awaited with every change,
    one at a time, in order; `clock` is wall time (memberships are dated)."""

    def __init__(
        self,
        config: DiscoveryConfig,
        identity: NodeIdentity,
        apply: Callable[[PeerSetChange], Awaitable[None]],
        *,
        static: dict[str, tuple[str, ...]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.identity = identity
        self._apply = apply
        self._clock = clock
        self.table = MemberTable(config.membership, config.trusted, prefix=config.prefix, static=static)
        self.connected = False
        self.revision = 0
        self.sequence = 0
        self._own_key = f"{config.prefix}{MEMBERS_DIR}{config.membership.id}"
        self._task: asyncio.Task[None] | None = None
        self._expiry_task: asyncio.Task[None] | None = None
        self._state_task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._lease_id: int | None = None
        self._lost_logged = False
        self._apply_lock = asyncio.Lock()
        self._log_limit = LogLimiter(_log, LOG_INTERVAL)
        self._rearm = asyncio.Event()
        #: Set while the registry is connected and in sync with the store; `lost` while it is not (after it
        #: was once), so that tests and callers wait on the transition instead of polling.
        self.synced = asyncio.Event()
        self.lost = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Applies the state file, then connects in the background. Raises `MembershipError` when a held
        revocation covers this node's own membership."""
        entries, revocations, self.sequence = load_state(self.config.state)
        now = self._clock()
        for record in revocations:
            with contextlib.suppress(MembershipError):
                self.table.revocations.add(verify_revocation(record, self.config.trusted, now))
        revoked = self.table.revocations.covering(self.config.membership)
        if revoked is not None:
            raise MembershipError("revoked", f"this node's own membership is revoked: {revoked.summary()}")
        change = PeerSetChange()
        for record in entries:
            try:
                entry = verify_entry(record, self.config.trusted, now, self.table.revocations)
            except MembershipError:
                continue
            change.merge(
                self.table.put(f"{self.config.prefix}{MEMBERS_DIR}{entry.membership.id}", record, now)
            )
        if change:
            _log.info("discovery: %d members from the state file %s", len(change.added), self.config.state)
            await self._apply_change(change)
        self._task = asyncio.create_task(self._run(), name="vpn-packet discovery")
        self._expiry_task = asyncio.create_task(self._expire_loop(), name="vpn-packet discovery expiry")

    async def stop(self) -> None:
        """Leaves: revokes the lease (the others drop this node at once), writes the state, closes. Each step
        is bounded (`CLOSE_TIMEOUT`), whatever the etcd client does with a cancellation."""
        tasks = [t for t in (self._task, self._expiry_task, self._state_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            if stuck:
                _log.warning("discovery: %d task(s) ignored cancellation at stop; left behind", len(stuck))
        if self._client is not None and self._lease_id is not None and self.connected:
            await _bounded(self._client.revoke_lease(self._lease_id), CLOSE_TIMEOUT)
        await self._close_client()
        self._write_state()

    # --- the connection loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = RECONNECT_BACKOFF
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                self.synced.clear()
                self.lost.set()
                if not self._lost_logged:
                    self._lost_logged = True
                    _log.warning(
                        "discovery: etcd %s unreachable (%s): tunnels keep working, the membership is frozen "
                        "until it is back",
                        ",".join(self.config.etcd),
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                    )
                await self._close_client()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))  # backoff with jitter between attempts
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)

    async def _session(self) -> None:
        """One connected session: publish, read, watch and renew until something fails."""
        from vpn_packet.mesh.etcd import TlsEtcdClient  # the optional extra, loaded only now

        c = self.config
        # A new client (and gRPC channel) per session: nothing of a broken one is reused.
        client = self._client = TlsEtcdClient(
            c.etcd, ca=c.ca, cert=c.cert, key=c.key, timeout=max(1.0, c.ttl / 3)
        )
        ttl = c.ttl
        # Read (and apply) the members first, then publish: whoever sees this node's entry finds this node
        # already knowing it, so its first packet here is not refused as from an unknown peer.
        listing = await client.get_prefix(self.config.prefix.encode())
        await self._resync(listing)
        lease = await client.lease(ttl)
        self._lease_id = lease.id
        await self._publish()
        self.connected = True
        if self._lost_logged:
            _log.warning("discovery: etcd is back (revision %d)", self.revision)
            self._lost_logged = False
        self.lost.clear()
        self.synced.set()
        watch = await client.watch_prefix(self.config.prefix.encode(), start_revision=self.revision + 1)
        renew = asyncio.create_task(self._renew(lease.id, ttl))
        try:
            async for event in watch:
                await self._event(event)
                if renew.done():
                    renew.result()  # raises what ended the renewals
        finally:
            # Bounded, and never swallowing this task's own cancellation (a `suppress(BaseException)` around
            # `await renew` did: a stop that cancelled the session there saw it carry on reconnecting, and
            # hung awaiting it).
            renew.cancel()
            await asyncio.wait({renew}, timeout=CLOSE_TIMEOUT)
            if renew.done():
                _retrieve(renew)
            await _bounded(watch.cancel(), CLOSE_TIMEOUT)
        raise ConnectionError("the watch ended")

    async def _close_client(self) -> None:
        """Closes the gRPC channel, bounded: aetcd's close waits on its watcher's queue and stream, which a
        dead connection can leave stuck (the reconnect loop must never hang on it)."""
        client, self._client = self._client, None
        if client is not None:
            await _bounded(client.close(), CLOSE_TIMEOUT)

    async def _renew(self, lease_id: int, ttl: int) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            reply = await self._client.refresh_lease(lease_id)
            if reply is None or reply.TTL <= 0:  # the lease expired meanwhile: publish again under a new one
                lease = await self._client.lease(ttl)
                self._lease_id = lease_id = lease.id
                await self._publish()

    async def _publish(self) -> None:
        self.sequence = max(self.sequence + 1, int(self._clock() * 1000))
        entry = sign_entry(
            self.identity, self.config.membership, endpoint=self.config.endpoint, sequence=self.sequence
        )
        await self._client.put(self._own_key.encode(), entry.record, lease=self._lease_id)

    async def _resync(self, listing: Any) -> None:
        """The whole prefix as read: applies every entry and removes what is no longer there."""
        self.revision = listing.header.revision
        now = self._clock()
        change = PeerSetChange()
        present: set[str] = set()
        for kv in listing.kvs:
            key = kv.key.decode(errors="replace")
            if key.startswith(f"{self.config.prefix}{MEMBERS_DIR}"):
                present.add(key[len(self.config.prefix) + len(MEMBERS_DIR) :])
            change.merge(self.table.put(key, kv.value, now))
        for entry in list(self.table.entries()):
            if entry.membership.id not in present:
                change.merge(self.table.delete(f"{self.config.prefix}{MEMBERS_DIR}{entry.membership.id}"))
        await self._changed(change)

    async def _event(self, event: Any) -> None:
        key = event.kv.key.decode(errors="replace")
        self.revision = max(self.revision, event.kv.mod_revision)
        if event.kind == "DELETE":
            change = self.table.delete(key)
        else:
            change = self.table.put(key, event.kv.value, self._clock())
        await self._changed(change)

    async def _changed(self, change: PeerSetChange) -> None:
        refusal, alarm = self.table.last_refusal, self.table.last_alarm
        # Rate-limited per reason: whoever can write to etcd must not be able to flood the log either.
        if refusal:
            self._log_limit.warning(self.table.last_refusal_reason, "discovery: refused %s", refusal)
            self.table.last_refusal = ""
        if alarm:
            self._log_limit.warning("overlap", "discovery: alarm: %s", alarm)
            self.table.last_alarm = ""
        if change:
            await self._apply_change(change)
            self._schedule_state_write()
            self._rearm.set()  # the next expiry may be sooner now

    async def _expire_loop(self) -> None:
        """Removes memberships as they expire: waits until the next expiry, or until re-armed by a change
        (the next expiry may be sooner then)."""
        from vpn_packet.tuning import CLOCK_SKEW

        while True:
            self._rearm.clear()
            due = self.table.next_expiry()
            delay = None if due is None else max(0.0, due + CLOCK_SKEW + 1 - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._rearm.wait()
            change = self.table.expire(self._clock())
            if change:
                _log.info("discovery: memberships expired: %s", ", ".join(sorted(change.removed)))
                await self._apply_change(change)
                self._schedule_state_write()

    async def _apply_change(self, change: PeerSetChange) -> None:
        """`apply`, one change at a time, in the order they were made (the watch and the expiry timer both
        make changes; asyncio's lock queues them first come, first served)."""
        async with self._apply_lock:
            try:
                await self._apply(change)
            except Exception:  # the node's fault, not etcd's: logged, and the registry goes on
                _log.exception(
                    "discovery: applying a change failed (%d added, %d updated, %d removed)",
                    len(change.added),
                    len(change.updated),
                    len(change.removed),
                )

    # --- the state file -------------------------------------------------------------------------------------

    def _schedule_state_write(self) -> None:
        if self._state_task is None or self._state_task.done():
            self._state_task = asyncio.create_task(self._write_state_later())

    async def _write_state_later(self) -> None:
        await asyncio.sleep(STATE_WRITE_INTERVAL)
        self._write_state()

    def _write_state(self) -> None:
        data = {
            "entries": [base64.b64encode(entry.record).decode() for entry in self.table.entries()],
            "revocations": [base64.b64encode(r.record).decode() for r in self.table.revocations],
            "sequence": self.sequence,
            "revision": self.revision,
        }
        path = self.config.state
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the unit's StateDirectory, or ours
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(json.dumps(data))
            os.replace(temporary, path)
        except OSError as exc:
            _log.warning("discovery: cannot write the state file %s: %s", path, exc)

    # --- status ---------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The discovery state for `status --json` and the metrics."""
        return {
            "connected": self.connected,
            "revision": self.revision,
            "members": len(self.table.applied()),
            "refused": dict(self.table.refused),
            "overlap_alarms": self.table.overlap_alarms,
            "conflicts": sorted(self.table.conflicts()),
            "revocations": len(self.table.revocations),
        }


async def _bounded(call: Awaitable[Any], seconds: float) -> None:
    """Runs `call` for at most `seconds`, its errors ignored (a best effort at leaving). Unlike
    `asyncio.wait_for`, which waits for a cancelled call to finish, this never waits longer: a gRPC call that
    swallows its cancellation (seen as a test hung in `stop()`) is left to end on its own."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        return
    _retrieve(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Marks the outcome of a best-effort call as seen (no "exception was never retrieved" at exit)."""
    if not task.cancelled():
        task.exception()
