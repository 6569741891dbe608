"""Typed errors of vpn-packet and predicates that classify any exception chain.

Every class carries a `retriable` attribute: whether trying the same operation again (on a fresh stream) can
succeed. `NetworkError` and `ServiceError` decide per instance, from the exception they wrap.

The predicates (`is_network_error`, `is_temporary_error`, ...) accept any `BaseException | None`. They walk
the chain the way a traceback shows it (`__cause__` when set, otherwise `__context__` unless suppressed by
`raise ... from None`), stop on cycles, and classify Python's own exceptions by type and errno, never by
message text:

- connection reset: `ConnectionResetError`, `BrokenPipeError`, `ConnectionAbortedError`, and errnos
  ECONNRESET, EPIPE, ECONNABORTED, ENETRESET; `ssl.SSLSyscallError` (the socket failed under TLS);
- temporary: `TimeoutError`, `BlockingIOError`, `InterruptedError`, errnos EAGAIN/EWOULDBLOCK, ETIMEDOUT,
  ENOBUFS, EINTR, `socket.gaierror` with EAI_AGAIN, `ssl.SSLWantReadError`/`SSLWantWriteError`;
- stream closed: `EOFError` (so `asyncio.IncompleteReadError`), errnos ENOTCONN, ESHUTDOWN, EBADF (a closed
  socket), `ssl.SSLZeroReturnError` and `ssl.SSLEOFError`;
- network: all of the above except plain `EOFError`/EBADF/EAGAIN/EINTR, plus any `ConnectionError`,
  `socket.gaierror`/`herror`, other `ssl.SSLError`s (for example `SSLCertVerificationError`, which is *not*
  temporary), `TlsError` (the native core's TLS failures, likewise) and network errnos (ECONNREFUSED,
  EHOSTUNREACH, ENETUNREACH, ...).

Other exception types are taught with `register_error_kind`. `PacketError` is also raised by the native module
(rust/python/src/errors.rs imports it from here as `PacketError(message, reason)`).
"""

from __future__ import annotations

# `_socket` (built in) rather than `socket`, and TLS and asyncio errors looked up only once their modules
# are loaded (`_ssl_kinds`, `_kinds_of`): loading `ssl` (OpenSSL) and `asyncio` costs tens of milliseconds,
# and every command imports this module, `vpn-packet inspect` included. An exception of a module that was
# never loaded cannot exist, so the classification is the same.
import errno as _errno
import sys
from _socket import EAI_AGAIN, gaierror, herror

# Not `typing.TYPE_CHECKING`: `typing` costs milliseconds to load, and every annotation here is a string
# (`from __future__ import annotations`); type checkers treat any name `TYPE_CHECKING` as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any, Final, TypeVar

    _E = TypeVar("_E", bound=type[BaseException])

__all__ = [
    "CaptureError",
    "CircuitOpenError",
    "ConfigError",
    "DetachedCause",
    "DispatcherStoppedError",
    "FramingError",
    "HandshakeRefusedError",
    "IdentityError",
    "IsConnectionResetError",
    "IsNetworkError",
    "IsServiceError",
    "IsStreamClosedError",
    "IsTemporaryError",
    "MembershipError",
    "NetworkError",
    "PacketError",
    "PeerNotFoundError",
    "QueueFullError",
    "ServiceError",
    "TlsError",
    "UsageError",
    "VpnPacketError",
    "WorkerLimitError",
    "is_connection_reset_error",
    "is_handshake_refused_error",
    "is_network_error",
    "is_retriable_error",
    "is_service_error",
    "is_stream_closed_error",
    "is_temporary_error",
    "register_error_kind",
    "unregister_error_kind",
]


# Kinds, as bit flags so that one walk of a chain can answer any question.
_NETWORK: Final = 1
_TEMPORARY: Final = 2
_RESET: Final = 4
_CLOSED: Final = 8
_SERVICE: Final = 16
_REFUSED: Final = 32
_RETRIABLE_KINDS: Final = _TEMPORARY | _RESET | _CLOSED


class VpnPacketError(Exception):
    """Base class of every error raised by vpn-packet."""

    retriable: bool = False


class PacketError(VpnPacketError, ValueError):
    """A packet has no trustworthy addresses (empty, wrong version, shorter than its fixed header, bad IHL).

    `reason` is a short stable name (`empty`, `unsupported_version`, `truncated`, `invalid_ihl`) for
    counting drops by reason. Not retriable: the same bytes fail the same way.
    """

    retriable = False

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message, reason)
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message


def _where(worker_id: str | None, peer_id: str | None, dest_ip: str | None) -> str:
    parts = []
    if peer_id is not None:
        parts.append(f"peer {peer_id}")
    if dest_ip is not None:
        parts.append(f"dest {dest_ip}")
    if worker_id is not None:
        parts.append(f"worker {worker_id}")
    return f" ({', '.join(parts)})" if parts else ""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = exc.type_name if isinstance(exc, DetachedCause) else type(exc).__name__
    return f"{name}: {text}" if text else name


class _WrappedError(VpnPacketError):
    """Common part of `NetworkError` and `ServiceError`: a cause plus where it happened.

    The kinds of the cause's chain are computed once, at construction, so that the classification survives
    pickling even though Python does not pickle `__cause__` chains.
    """

    _own_kind: int = 0

    def __init__(
        self,
        cause: BaseException,
        *,
        worker_id: str | None = None,
        peer_id: str | None = None,
        dest_ip: str | None = None,
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.worker_id = worker_id
        self.peer_id = peer_id
        self.dest_ip = dest_ip
        self.__cause__ = cause
        self._cause_kinds = _chain_kinds(cause)
        self.retriable = is_retriable_error(cause)

    @property
    def temporary(self) -> bool:
        """The cause (or its chain) is a temporary condition: a timeout, EAGAIN, ENOBUFS, EINTR, ..."""
        return bool(self._cause_kinds & _TEMPORARY)

    @property
    def connection_reset(self) -> bool:
        """The cause (or its chain) is a reset connection: ECONNRESET, EPIPE, ECONNABORTED, ..."""
        return bool(self._cause_kinds & _RESET)

    @property
    def stream_closed(self) -> bool:
        """The cause (or its chain) is a stream closed under us: EOF, incomplete read, TLS close, ..."""
        return bool(self._cause_kinds & _CLOSED)

    def _ctor_args(self) -> tuple[Any, ...]:
        return ()

    def __repr__(self) -> str:
        args = [repr(self.cause), *map(repr, self._ctor_args())]
        fields = {"worker_id": self.worker_id, "peer_id": self.peer_id, "dest_ip": self.dest_ip}
        fields.update(self._extra_kwargs())
        args += [f"{name}={value!r}" for name, value in fields.items() if value is not None]
        return f"{type(self).__name__}({', '.join(args)})"

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = {"worker_id": self.worker_id, "peer_id": self.peer_id, "dest_ip": self.dest_ip}
        kwargs.update(self._extra_kwargs())
        cause = _portable(self.cause, self._cause_kinds)
        return (_rebuild, (type(self), (cause, *self._ctor_args()), kwargs))

    def _extra_kwargs(self) -> dict[str, Any]:
        return {}


def _rebuild(cls: type[_WrappedError], args: tuple[Any, ...], kwargs: dict[str, Any]) -> _WrappedError:
    return cls(*args, **kwargs)


def _portable(cause: BaseException, kinds: int) -> BaseException:
    """`cause` if it survives a pickle round trip with its classification, else a `DetachedCause`."""
    import pickle  # only when a wrapped error is made: not at import time

    try:
        copy = pickle.loads(pickle.dumps(cause))
    except Exception:
        copy = None
    if isinstance(copy, BaseException) and _chain_kinds(copy) == kinds:
        return cause
    return DetachedCause.from_exception(cause, kinds)


class DetachedCause(VpnPacketError):
    """Stands in for a cause that could not be pickled (or lost its classification on the way).

    Keeps the original type name, its text and what the predicates said about it, so that a `NetworkError`
    received from another process still answers `temporary`, `connection_reset`, ... as it did at home.
    """

    def __init__(self, type_name: str, message: str, kinds: int = 0) -> None:
        super().__init__(type_name, message, kinds)
        self.type_name = type_name
        self.message = message
        self.kinds = kinds
        self.retriable = bool(kinds & _RETRIABLE_KINDS)

    @classmethod
    def from_exception(cls, exc: BaseException, kinds: int | None = None) -> DetachedCause:
        """A detached copy of `exc`; `kinds` defaults to the classification of its whole chain."""
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return cls(name, str(exc), _chain_kinds(exc) if kinds is None else kinds)

    def __str__(self) -> str:
        return self.message


class NetworkError(_WrappedError):
    """Sending to or receiving from a peer failed at the network level.

    `temporary`, `connection_reset` and `stream_closed` are derived from `cause`; the instance is
    `retriable` when any of them holds (or the cause says it is retriable): a retry on a fresh stream may
    work. `operation` optionally names what was being done (`write`, `connect`, ...).
    """

    _own_kind = _NETWORK

    def __init__(
        self,
        cause: BaseException,
        *,
        worker_id: str | None = None,
        peer_id: str | None = None,
        dest_ip: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(cause, worker_id=worker_id, peer_id=peer_id, dest_ip=dest_ip)
        self.operation = operation

    def _extra_kwargs(self) -> dict[str, Any]:
        return {"operation": self.operation}

    def __str__(self) -> str:
        what = f"network error during {self.operation}" if self.operation else "network error"
        return f"{what}{_where(self.worker_id, self.peer_id, self.dest_ip)}: {_describe(self.cause)}"


class ServiceError(_WrappedError):
    """A call to a collaborating service (`service`.`operation`, e.g. `discovery.get_peer_id`) failed.

    Retriable when its cause is (a timeout, a reset, ...).
    """

    _own_kind = _SERVICE

    def __init__(
        self,
        cause: BaseException,
        service: str,
        operation: str,
        *,
        worker_id: str | None = None,
        peer_id: str | None = None,
        dest_ip: str | None = None,
    ) -> None:
        super().__init__(cause, worker_id=worker_id, peer_id=peer_id, dest_ip=dest_ip)
        self.service = service
        self.operation = operation

    def _ctor_args(self) -> tuple[Any, ...]:
        return (self.service, self.operation)

    def __str__(self) -> str:
        where = _where(self.worker_id, self.peer_id, self.dest_ip)
        return f"{self.service}.{self.operation} failed{where}: {_describe(self.cause)}"


class QueueFullError(VpnPacketError):
    """The queue of `sync_key` already holds `capacity` packets. Retriable: the queue drains."""

    retriable = True

    def __init__(self, sync_key: str, capacity: int) -> None:
        super().__init__(sync_key, capacity)
        self.sync_key = sync_key
        self.capacity = capacity

    def __str__(self) -> str:
        return f"queue for {self.sync_key} is full (capacity {self.capacity})"


class WorkerLimitError(VpnPacketError):
    """A new key `sync_key` was rejected: `limit` workers exist, none idle. Retriable: workers go idle."""

    retriable = True

    def __init__(self, sync_key: str, limit: int) -> None:
        super().__init__(sync_key, limit)
        self.sync_key = sync_key
        self.limit = limit

    def __str__(self) -> str:
        return f"worker limit {self.limit} reached; new key {self.sync_key} rejected"


class DispatcherStoppedError(VpnPacketError):
    """The dispatcher is stopped (or stopping) and takes no more packets. Not retriable."""

    retriable = False

    def __init__(self, message: str = "dispatcher is stopped") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PeerNotFoundError(VpnPacketError, LookupError):
    """No peer owns `dest_ip`. Not retriable: the answer does not change until the peer table does."""

    retriable = False

    def __init__(self, dest_ip: str) -> None:
        super().__init__(dest_ip)
        self.dest_ip = dest_ip

    def __str__(self) -> str:
        return f"no peer found for destination {self.dest_ip}"


class HandshakeRefusedError(VpnPacketError):
    """`peer_id` answered our handshake with a refusal: `reason` is its stable name (`unknown_peer`,
    `key_mismatch`, `bad_signature`, `unsupported_version`, `too_many_connections`, `identity_mismatch`,
    `shutting_down`, `key_required`, `bad_hello`, `bad_key`), `detail` what the peer said.

    Retriable only when the refusal is passing (`too_many_connections`, `shutting_down`): a wrong key or an
    unknown id stays wrong until someone changes a config, and retrying would only hammer the peer.
    """

    _PASSING: Final = frozenset({"too_many_connections", "shutting_down"})
    _EXPLAINED: Final = {
        "unknown_peer": "it has no peer {us}",
        "key_mismatch": "our key is not the one it has for {local_id}",
        "bad_signature": "our hello's signature did not verify",
        "unsupported_version": "it speaks another protocol version",
        "too_many_connections": "it is at its connection limit",
        "identity_mismatch": "our certificate does not name us as {local_id} alone",
        "shutting_down": "it is shutting down",
        "key_required": "it authenticates peers by key and we sent none (are we insecure?)",
        "bad_hello": "our hello was malformed",
        "bad_key": "our public key is not one it can trust (small order or not canonical)",
    }

    def __init__(self, peer_id: str, reason: str, detail: str = "", *, local_id: str | None = None) -> None:
        super().__init__(peer_id, reason, detail)
        self.peer_id = peer_id
        self.reason = reason
        self.detail = detail
        self.local_id = local_id

    @property
    def retriable(self) -> bool:  # type: ignore[override]
        return self.reason in self._PASSING

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_refusal, (self.peer_id, self.reason, self.detail, self.local_id))

    def __str__(self) -> str:
        us = f"{self.local_id!r}" if self.local_id else "with our key"
        template = self._EXPLAINED.get(self.reason, "reason {reason}")
        explained = template.format(us=us, local_id=self.local_id or "us", reason=self.reason)
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.peer_id} refused us: {explained}{extra}"


def _rebuild_refusal(peer_id: str, reason: str, detail: str, local_id: str | None) -> HandshakeRefusedError:
    return HandshakeRefusedError(peer_id, reason, detail, local_id=local_id)


class TlsError(VpnPacketError):
    """TLS failed on a connection of the native core (rustls), or refused the peer's certificate.

    `reason` is one of `vpn_packet._native.CONNECTION_FAILURE_REASONS`: `key_mismatch`,
    `identity_mismatch`, `no_ed25519_key` and `weak_key` when our check of the server's certificate refused
    it (the server holds another key than the one configured for the peer dialled, or its certificate
    names someone else); `tls_certificate`, `tls_alert`, `tls_bad_record`, `tls_incompatible`, ... for the
    rest. `detail` says what was seen. A network error that is not temporary, as `ssl.SSLError` is on the
    Python path it replaces: trying again meets the same certificate until someone changes a config.
    """

    retriable = False

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail, reason)
        self.detail = detail
        self.reason = reason

    def __str__(self) -> str:
        return self.detail


class CircuitOpenError(VpnPacketError):
    """The circuit breaker of `peer_id` rejects calls; `retry_after` (seconds) says when it may admit one.

    Not retriable right away: retrying before `retry_after` is rejected the same way.
    """

    retriable = False

    def __init__(self, peer_id: str, retry_after: float | None = None) -> None:
        super().__init__(peer_id, retry_after)
        self.peer_id = peer_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        after = "" if self.retry_after is None else f"; retry after {self.retry_after:.3f}s"
        return f"circuit open for peer {self.peer_id}: call rejected{after}"


# --- classification -------------------------------------------------------------------------------------


def _errnos(*names: str) -> frozenset[int]:
    return frozenset(value for name in names if (value := getattr(_errno, name, None)) is not None)


_RESET_ERRNOS: Final = _errnos("ECONNRESET", "EPIPE", "ECONNABORTED", "ENETRESET")
_TEMPORARY_ERRNOS: Final = _errnos("EAGAIN", "EWOULDBLOCK", "ETIMEDOUT", "ENOBUFS", "EINTR")
_CLOSED_ERRNOS: Final = _errnos("ENOTCONN", "ESHUTDOWN", "EBADF")
_NETWORK_ERRNOS: Final = _RESET_ERRNOS | _errnos(
    "ETIMEDOUT",
    "ENOBUFS",
    "ENOTCONN",
    "ESHUTDOWN",
    "ECONNREFUSED",
    "EHOSTUNREACH",
    "EHOSTDOWN",
    "ENETUNREACH",
    "ENETDOWN",
    "EADDRNOTAVAIL",
)

_ERRNO_KINDS: Final[dict[int, int]] = {}
for _code in _RESET_ERRNOS | _TEMPORARY_ERRNOS | _CLOSED_ERRNOS | _NETWORK_ERRNOS:
    _ERRNO_KINDS[_code] = (
        (_RESET if _code in _RESET_ERRNOS else 0)
        | (_TEMPORARY if _code in _TEMPORARY_ERRNOS else 0)
        | (_CLOSED if _code in _CLOSED_ERRNOS else 0)
        | (_NETWORK if _code in _NETWORK_ERRNOS else 0)
    )
del _code

# OSError subclasses recognised by type (for instances built without an errno), most specific first.
_OSERROR_TYPE_KINDS: Final[tuple[tuple[type[OSError], int], ...]] = (
    (ConnectionResetError, _RESET | _NETWORK),
    (BrokenPipeError, _RESET | _NETWORK),
    (ConnectionAbortedError, _RESET | _NETWORK),
    (ConnectionError, _NETWORK),
    (TimeoutError, _TEMPORARY | _NETWORK),
    (BlockingIOError, _TEMPORARY),
    (InterruptedError, _TEMPORARY),
)

# TLS errors: their `errno` is an SSL_ERROR_* code, not a POSIX errno, so they never reach the errno table.
# Built on first need from `_ssl` (where `ssl` gets these classes), which is loaded by then.
_SSL_KINDS: list[tuple[type[ssl.SSLError], int]] = []


def _ssl_kinds(_ssl: Any) -> list[tuple[type[ssl.SSLError], int]]:
    if not _SSL_KINDS:
        _SSL_KINDS.extend(
            (
                (_ssl.SSLZeroReturnError, _CLOSED | _NETWORK),  # the peer closed the TLS session cleanly
                (_ssl.SSLEOFError, _CLOSED | _NETWORK),  # the transport ended mid-record
                (_ssl.SSLWantReadError, _TEMPORARY | _NETWORK),
                (_ssl.SSLWantWriteError, _TEMPORARY | _NETWORK),
                (_ssl.SSLSyscallError, _RESET | _NETWORK),  # the socket under TLS failed
                (_ssl.SSLError, _NETWORK),  # handshake, certificate, protocol: permanent
            )
        )
    return _SSL_KINDS


_registry: dict[type[BaseException], int] = {}


def register_error_kind(
    exc_type: _E,
    *,
    network: bool = False,
    temporary: bool = False,
    connection_reset: bool = False,
    stream_closed: bool = False,
    service: bool = False,
) -> _E:
    """Teach the predicates about `exc_type` (and its subclasses, matched with `isinstance`).

    Kinds are added to what the built-in rules say, never taken away; registering a type again replaces its
    earlier registration. `temporary`, `connection_reset` and `stream_closed` make an exception retriable by
    `is_retriable_error` (unless it has its own `retriable` attribute). Returns `exc_type`, so it can be used
    at class definition::

        class QuicStreamReset(Exception): ...

        register_error_kind(QuicStreamReset, network=True, connection_reset=True)
    """
    if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
        raise TypeError(f"register_error_kind: expected an exception type, got {exc_type!r}")
    kinds = (
        (_NETWORK if network else 0)
        | (_TEMPORARY if temporary else 0)
        | (_RESET if connection_reset else 0)
        | (_CLOSED if stream_closed else 0)
        | (_SERVICE if service else 0)
    )
    _registry[exc_type] = kinds
    return exc_type


def unregister_error_kind(exc_type: type[BaseException]) -> None:
    """Forget a registration made with `register_error_kind` (no error if there was none)."""
    _registry.pop(exc_type, None)


def _kinds_of(exc: BaseException) -> int:
    """Kinds of one exception, ignoring its chain."""
    kinds = 0
    for registered, extra in _registry.items():
        if isinstance(exc, registered):
            kinds |= extra
    if isinstance(exc, _WrappedError):
        return kinds | exc._own_kind | exc._cause_kinds
    if isinstance(exc, HandshakeRefusedError):
        return kinds | _REFUSED
    if isinstance(exc, DetachedCause):
        return kinds | exc.kinds
    if isinstance(exc, TlsError):
        return kinds | _NETWORK
    _ssl = sys.modules.get("_ssl")
    if _ssl is not None and isinstance(exc, _ssl.SSLError):
        for ssl_type, ssl_kinds in _ssl_kinds(_ssl):
            if isinstance(exc, ssl_type):
                return kinds | ssl_kinds
    if isinstance(exc, gaierror):
        temporary = _TEMPORARY if exc.errno == EAI_AGAIN else 0
        return kinds | _NETWORK | temporary
    if isinstance(exc, herror):
        return kinds | _NETWORK
    if isinstance(exc, OSError):
        for os_type, os_kinds in _OSERROR_TYPE_KINDS:
            if isinstance(exc, os_type):
                kinds |= os_kinds
                break
        code = exc.errno
        if code is not None:
            kinds |= _ERRNO_KINDS.get(code, 0)
        return kinds
    asyncio_exceptions = sys.modules.get("asyncio.exceptions")
    if asyncio_exceptions is not None and isinstance(exc, asyncio_exceptions.IncompleteReadError):
        return kinds | _CLOSED | _NETWORK
    if isinstance(exc, EOFError):
        return kinds | _CLOSED
    return kinds


def _links(exc: BaseException) -> list[BaseException]:
    """The exceptions a traceback would show under `exc` (plus a wrapper's `cause` if re-chained)."""
    links: list[BaseException] = []
    if exc.__cause__ is not None:
        links.append(exc.__cause__)
    elif exc.__context__ is not None and not exc.__suppress_context__:
        links.append(exc.__context__)
    if isinstance(exc, _WrappedError) and exc.cause is not exc.__cause__:
        links.append(exc.cause)
    return links


def _chain_kinds(exc: BaseException | None, want: int = 0) -> int:
    """Union of the kinds along the chain of `exc`; stops early once a bit of `want` (if given) is found."""
    kinds = 0
    seen: set[int] = set()
    stack = [exc] if exc is not None else []
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        kinds |= _kinds_of(current)
        if kinds & want:
            return kinds
        stack.extend(_links(current))
    return kinds


def is_network_error(exc: BaseException | None) -> bool:
    """A network failure anywhere in the chain: a `NetworkError`, a socket/TLS error, a network errno."""
    return bool(_chain_kinds(exc, _NETWORK) & _NETWORK)


def is_service_error(exc: BaseException | None) -> bool:
    """A `ServiceError` (or a type registered with `service=True`) anywhere in the chain."""
    return bool(_chain_kinds(exc, _SERVICE) & _SERVICE)


def is_temporary_error(exc: BaseException | None) -> bool:
    """A temporary condition anywhere in the chain: timeout, EAGAIN/EWOULDBLOCK, ETIMEDOUT, ENOBUFS, EINTR."""
    return bool(_chain_kinds(exc, _TEMPORARY) & _TEMPORARY)


def is_connection_reset_error(exc: BaseException | None) -> bool:
    """A reset or broken connection anywhere in the chain: ECONNRESET, EPIPE, ECONNABORTED, ENETRESET."""
    return bool(_chain_kinds(exc, _RESET) & _RESET)


def is_stream_closed_error(exc: BaseException | None) -> bool:
    """A stream closed under us anywhere in the chain: EOF, incomplete read, TLS close, closed socket."""
    return bool(_chain_kinds(exc, _CLOSED) & _CLOSED)


def is_handshake_refused_error(exc: BaseException | None) -> bool:
    """A peer answered our handshake with a refusal anywhere in the chain (`HandshakeRefusedError`)."""
    return bool(_chain_kinds(exc, _REFUSED) & _REFUSED)


def is_retriable_error(exc: BaseException | None) -> bool:
    """Whether retrying the operation (on a fresh stream) may succeed.

    An exception with a boolean `retriable` attribute (every `VpnPacketError`) decides for itself, so a
    `DispatcherStoppedError` raised while handling a reset is not retried. Any other exception is retriable
    when its chain is temporary, a connection reset or a closed stream.
    """
    if exc is None:
        return False
    retriable = getattr(exc, "retriable", None)
    if isinstance(retriable, bool):
        return retriable
    return bool(_chain_kinds(exc, _RETRIABLE_KINDS) & _RETRIABLE_KINDS)


# Go spellings, kept for callers of the original package.
IsNetworkError = is_network_error
IsServiceError = is_service_error
IsTemporaryError = is_temporary_error
IsConnectionResetError = is_connection_reset_error
IsStreamClosedError = is_stream_closed_error


# --- framing (transport receiving side) ------------------------------------------------------------------


class FramingError(VpnPacketError, ValueError):
    """A stream breaks the wire protocol (a bad hello, or a frame length of 0 or above the maximum).

    Raised by the native framing code (`FrameDecoder.feed`, `parse_hello`, `encode_frames`, `encode_hello`).
    `reason` is a short stable name for counting: `zero_length`, `too_large` (frames); `bad_magic`,
    `unsupported_version`, `empty_peer_id`, `peer_id_too_long`, `invalid_peer_id` (hello). `length` is the
    offending frame length when there is one. `frames` holds the packets a `FrameDecoder.feed` call decoded
    before the bad length prefix (so nothing well-framed is lost), else `None`. Not retriable: the stream
    cannot be resynchronised and must be closed.
    """

    retriable = False

    def __init__(
        self,
        message: str,
        reason: str | None = None,
        length: int | None = None,
        frames: list[bytes] | None = None,
    ) -> None:
        super().__init__(message, reason, length, frames)
        self.message = message
        self.reason = reason
        self.length = length
        self.frames = frames

    def __str__(self) -> str:
        return self.message


# --- captures, configuration, command line -----------------------------------------------------------------


class CaptureError(VpnPacketError, ValueError):
    """A capture file cannot be read (further): not a pcap/pcapng file, truncated, or corrupt.

    `kind` is a short stable name (`not_a_capture`, `truncated_header`, `truncated`, `corrupt`,
    `record_too_large`); `offset` is the byte offset in the file the error is about, when there is one.
    Raised by the native `CaptureReader` (see rust/python/src/errors.rs).
    """

    def __init__(self, message: str, kind: str | None = None, offset: int | None = None) -> None:
        super().__init__(message, kind, offset)
        self.message = message
        self.kind = kind
        self.offset = offset

    def __str__(self) -> str:
        return self.message


class ConfigError(VpnPacketError, ValueError):
    """A bad node configuration; `key` is where (`"peers[1].allowed_ips[0]"`), and the message starts with
    it. A file that cannot be read or parsed has an empty `key`."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        text = str(self)
        return (ConfigError, (self.key, text[len(self.key) + 2 :] if self.key else text))


class UsageError(VpnPacketError):
    """A bad argument or input noticed by a `vpn-packet` command: reported on one line, exit status 2."""


class IdentityError(UsageError, ValueError):
    """A key file or public key string that cannot be used (`vpn_packet.transport.identity`); the message says
    which and why. A `UsageError`, so the `vpn-packet` commands report it on one line."""


class MembershipError(UsageError, ValueError):
    """A mesh membership, revocation or store entry that cannot be trusted or read
    (`vpn_packet.mesh.membership`). `reason` is a short stable name for counting (`malformed`, `bad_key`,
    `bad_signature`, `unknown_authority`, `authority_as_member`, `expired`, `not_yet_valid`, `revoked`,
    `superseded`, `validity_too_long`); the message says more. A `UsageError`, so `vpn-packet sign` and
    `revoke` report it on one line; a node counts it by `reason` and never applies the entry."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (MembershipError, (self.reason, str(self)))
