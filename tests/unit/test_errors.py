"""Error taxonomy: classes, messages, pickling, and the predicates over real built-in exceptions."""

from __future__ import annotations

import asyncio
import errno
import pickle
import socket
import ssl
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vpn_packet
from vpn_packet import (
    CircuitOpenError,
    DetachedCause,
    DispatcherStoppedError,
    NetworkError,
    PacketError,
    PeerNotFoundError,
    QueueFullError,
    ServiceError,
    VpnPacketError,
    WorkerLimitError,
    _native,
    is_connection_reset_error,
    is_network_error,
    is_retriable_error,
    is_service_error,
    is_stream_closed_error,
    is_temporary_error,
    register_error_kind,
    unregister_error_kind,
)
from vpn_packet.errors import HandshakeRefusedError, is_handshake_refused_error

PREDICATES = {
    "network": is_network_error,
    "temporary": is_temporary_error,
    "reset": is_connection_reset_error,
    "closed": is_stream_closed_error,
}


def kinds(exc: BaseException | None) -> set[str]:
    return {name for name, predicate in PREDICATES.items() if predicate(exc)}


def raised_from(outer: BaseException, cause: BaseException | None) -> BaseException:
    """`outer` as raised by `raise outer from cause`."""
    try:
        raise outer from cause
    except BaseException as exc:
        return exc


def raised_during(outer: BaseException, inner: BaseException) -> BaseException:
    """`outer` as raised while handling `inner` (implicit `__context__`)."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit context is what is under test
    except BaseException as exc:
        return exc


# --- classes ---------------------------------------------------------------------------------------------


def test_packet_error_keeps_the_native_contract() -> None:
    exc = PacketError("packet too short", "truncated")
    assert isinstance(exc, VpnPacketError)
    assert isinstance(exc, ValueError)
    assert (exc.message, exc.reason, str(exc)) == ("packet too short", "truncated", "packet too short")
    assert PacketError("empty").reason is None
    assert exc.retriable is False


def test_every_class_says_whether_it_is_retriable() -> None:
    expected: dict[type[VpnPacketError], bool] = {
        VpnPacketError: False,
        PacketError: False,
        QueueFullError: True,
        WorkerLimitError: True,
        DispatcherStoppedError: False,
        PeerNotFoundError: False,
        CircuitOpenError: False,
    }
    for cls, retriable in expected.items():
        assert isinstance(cls.retriable, bool), cls
        assert cls.retriable is retriable, cls
    assert issubclass(PeerNotFoundError, LookupError)
    for cls in (NetworkError, ServiceError, DetachedCause):
        assert issubclass(cls, VpnPacketError)


ANSWER_REFUSALS = [reason for reason in _native.ANSWER_REASONS if reason != "accepted"]


@pytest.mark.parametrize("reason", ANSWER_REFUSALS)
def test_a_refusal_is_retriable_only_when_it_passes(reason: str) -> None:
    """Every refusal reason the wire can carry: only a full or stopping peer is worth retrying."""
    exc = HandshakeRefusedError("node-b", reason, "what it said", local_id="node-a")
    passing = reason in ("too_many_connections", "shutting_down")
    assert exc.retriable is passing
    assert is_retriable_error(exc) is passing
    assert isinstance(exc, VpnPacketError)
    assert (exc.peer_id, exc.reason, exc.detail, exc.local_id) == ("node-b", reason, "what it said", "node-a")
    text = str(exc)
    assert text.startswith("node-b refused us: ")
    assert text.endswith("(what it said)")
    assert is_handshake_refused_error(exc)
    assert kinds(exc) == set()  # a refusal is an answer, not a network failure


def test_a_refusal_says_why_in_words() -> None:
    mismatch = HandshakeRefusedError("node-b", "key_mismatch", local_id="node-a")
    assert str(mismatch) == "node-b refused us: our key is not the one it has for node-a"
    assert str(HandshakeRefusedError("node-b", "unknown_peer", local_id="node-a")) == (
        "node-b refused us: it has no peer 'node-a'"
    )
    # A reason this version does not know is still named.
    assert "refused_42" in str(HandshakeRefusedError("node-b", "refused_42"))
    assert not HandshakeRefusedError("node-b", "refused_42").retriable


def test_a_refusal_is_found_anywhere_in_a_chain() -> None:
    refusal = HandshakeRefusedError("node-b", "key_mismatch", local_id="node-a")
    assert is_handshake_refused_error(raised_from(RuntimeError("open failed"), refusal))
    assert is_handshake_refused_error(raised_during(KeyError("k"), refusal))
    wrapped = NetworkError(refusal, peer_id="node-b", operation="handshake")
    assert is_handshake_refused_error(wrapped)
    assert is_handshake_refused_error(ServiceError(wrapped, "pool", "get_stream", peer_id="node-b"))
    # The wrapper defers to the refusal: a wrong key does not get better on a fresh stream.
    assert not wrapped.retriable
    assert not is_retriable_error(ServiceError(wrapped, "pool", "get_stream"))
    assert NetworkError(HandshakeRefusedError("node-b", "too_many_connections")).retriable
    assert not is_handshake_refused_error(NetworkError(ConnectionResetError()))
    assert not is_handshake_refused_error(CircuitOpenError("node-b"))


def test_network_error_fields_flags_and_message() -> None:
    cause = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    exc = NetworkError(cause, worker_id="w-7", peer_id="node-b", dest_ip="10.8.0.2", operation="write")
    assert exc.cause is cause
    assert exc.__cause__ is cause
    assert (exc.worker_id, exc.peer_id, exc.dest_ip, exc.operation) == ("w-7", "node-b", "10.8.0.2", "write")
    assert exc.connection_reset
    assert not exc.temporary
    assert not exc.stream_closed
    assert exc.retriable is True
    message = str(exc)
    for part in ("node-b", "10.8.0.2", "w-7", "write", "ConnectionResetError"):
        assert part in message
    assert "peer_id='node-b'" in repr(exc)


@pytest.mark.parametrize(
    ("cause", "temporary", "reset", "closed"),
    [
        (TimeoutError(), True, False, False),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), False, True, False),
        (asyncio.IncompleteReadError(b"ab", 4), False, False, True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), False, False, False),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), False, False, False),
    ],
)
def test_network_error_flags_follow_the_cause(
    cause: BaseException, temporary: bool, reset: bool, closed: bool
) -> None:
    exc = NetworkError(cause, peer_id="p")
    assert (exc.temporary, exc.connection_reset, exc.stream_closed) == (temporary, reset, closed)
    assert exc.retriable is (temporary or reset or closed)
    assert is_network_error(exc)


def test_network_error_is_not_retriable_when_its_cause_says_so() -> None:
    # The cause's own verdict wins: a stopped dispatcher is not retried even if it was caused by a reset.
    stopped = raised_from(DispatcherStoppedError(), ConnectionResetError())
    assert NetworkError(stopped).retriable is False
    assert NetworkError(QueueFullError("k", 1)).retriable is True


def test_service_error_fields_and_message() -> None:
    cause = TimeoutError("lookup timed out")
    exc = ServiceError(
        cause, "discovery", "get_peer_id", peer_id="node-b", dest_ip="10.8.0.2", worker_id="w1"
    )
    assert (exc.service, exc.operation, exc.cause) == ("discovery", "get_peer_id", cause)
    assert exc.__cause__ is cause
    assert exc.temporary
    assert exc.retriable
    assert is_service_error(exc)
    assert is_network_error(exc)  # a timeout is in its chain
    message = str(exc)
    for part in ("discovery.get_peer_id", "node-b", "10.8.0.2", "w1", "TimeoutError", "lookup timed out"):
        assert part in message
    assert not ServiceError(KeyError("x"), "pool", "get_stream").retriable


def test_plain_errors_keep_their_arguments_and_name_them() -> None:
    queue_full = QueueFullError("10.8.0.2:80", 100)
    assert (queue_full.sync_key, queue_full.capacity) == ("10.8.0.2:80", 100)
    assert "10.8.0.2:80" in str(queue_full)
    assert "100" in str(queue_full)

    limit = WorkerLimitError("10.8.0.3:443", 64)
    assert (limit.sync_key, limit.limit) == ("10.8.0.3:443", 64)
    assert "10.8.0.3:443" in str(limit)
    assert "64" in str(limit)

    assert str(DispatcherStoppedError()) == "dispatcher is stopped"
    assert DispatcherStoppedError("stopping").message == "stopping"

    missing = PeerNotFoundError("10.9.9.9")
    assert missing.dest_ip == "10.9.9.9"
    assert "10.9.9.9" in str(missing)

    rejected = CircuitOpenError("node-b", 12.5)
    assert (rejected.peer_id, rejected.retry_after) == ("node-b", 12.5)
    assert "node-b" in str(rejected)
    assert "12.500" in str(rejected)
    assert CircuitOpenError("node-c").retry_after is None


# --- pickling --------------------------------------------------------------------------------------------


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be unpickled (a classic: __init__ signature differs from args)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


class HoldsASocket(Exception):
    def __init__(self) -> None:
        super().__init__("has a lock")
        self.lock = __import__("threading").Lock()  # not picklable


def _same(a: BaseException, b: BaseException) -> None:
    assert type(a) is type(b)
    assert str(a) == str(b)
    assert a.args == b.args


@pytest.mark.parametrize(
    "exc",
    [
        VpnPacketError("x"),
        PacketError("bad", "truncated"),
        PacketError("bad"),
        QueueFullError("k:1", 10),
        WorkerLimitError("k:2", 3),
        DispatcherStoppedError(),
        DispatcherStoppedError("custom"),
        PeerNotFoundError("10.0.0.1"),
        CircuitOpenError("p", 1.5),
        CircuitOpenError("p"),
        DetachedCause("mod.Type", "text", 4),
        HandshakeRefusedError("node-b", "key_mismatch", "not your key", local_id="node-a"),
        HandshakeRefusedError("node-b", "too_many_connections"),
    ],
    ids=repr,
)
def test_plain_errors_pickle_round_trip(exc: BaseException) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    _same(exc, copy)
    assert vars(copy) == vars(exc)


def test_network_error_with_cause_pickles_round_trip() -> None:
    exc = NetworkError(
        OSError(errno.ETIMEDOUT, "timed out"),
        worker_id="w",
        peer_id="p",
        dest_ip="10.0.0.2",
        operation="write",
    )
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is NetworkError
    assert (copy.worker_id, copy.peer_id, copy.dest_ip, copy.operation) == ("w", "p", "10.0.0.2", "write")
    assert type(copy.cause) is TimeoutError
    assert copy.cause.errno == errno.ETIMEDOUT
    assert copy.__cause__ is copy.cause
    assert copy.temporary
    assert copy.retriable
    assert str(copy) == str(exc)


def test_network_error_around_a_refusal_pickles_round_trip() -> None:
    exc = NetworkError(
        HandshakeRefusedError("node-b", "key_mismatch", "x", local_id="node-a"), peer_id="node-b"
    )
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy.cause) is HandshakeRefusedError
    assert (copy.cause.reason, copy.cause.local_id) == ("key_mismatch", "node-a")
    assert is_handshake_refused_error(copy)
    assert not copy.retriable
    assert str(copy) == str(exc)


def test_nested_service_error_pickles_round_trip() -> None:
    inner = NetworkError(asyncio.IncompleteReadError(b"", 4), peer_id="p")
    exc = ServiceError(inner, "pool", "get_stream", peer_id="p", dest_ip="10.0.0.3")
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.service, copy.operation, copy.dest_ip) == ("pool", "get_stream", "10.0.0.3")
    assert type(copy.cause) is NetworkError
    assert copy.cause.stream_closed
    assert is_service_error(copy)
    assert is_stream_closed_error(copy)
    assert copy.retriable


@pytest.mark.parametrize("cause", [NeedsTwoArgs("a", "b"), HoldsASocket()], ids=lambda e: type(e).__name__)
def test_unpicklable_cause_degrades_to_a_detached_copy(cause: Exception) -> None:
    register_error_kind(type(cause), network=True, connection_reset=True)
    try:
        exc = NetworkError(cause, peer_id="p", dest_ip="10.0.0.4")
        copy = pickle.loads(pickle.dumps(exc))
    finally:
        unregister_error_kind(type(cause))
    assert isinstance(copy.cause, DetachedCause)
    assert copy.cause.type_name.endswith(type(cause).__qualname__)
    assert copy.cause.message == str(cause)
    # The classification made at home survives, although the type is unknown here.
    assert copy.connection_reset
    assert copy.retriable
    assert is_connection_reset_error(copy)
    assert type(cause).__name__ in str(copy)
    assert "10.0.0.4" in str(copy)


def test_cause_whose_classification_lives_in_its_chain_survives_pickling() -> None:
    # Python does not pickle __cause__, so the reset would be lost; it is kept through a DetachedCause.
    cause = raised_from(RuntimeError("write failed"), ConnectionResetError())
    exc = NetworkError(cause)
    assert exc.connection_reset
    copy = pickle.loads(pickle.dumps(exc))
    assert copy.connection_reset
    assert copy.retriable


# --- predicates on built-in exceptions ------------------------------------------------------------------


N, T, R, C = "network", "temporary", "reset", "closed"


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError(), {N, R}),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), {N, R}),
        (OSError(errno.ECONNRESET, "reset"), {N, R}),
        (BrokenPipeError(), {N, R}),
        (OSError(errno.EPIPE, "Broken pipe"), {N, R}),
        (ConnectionAbortedError(), {N, R}),
        (OSError(errno.ECONNABORTED, "aborted"), {N, R}),
        (OSError(errno.ENETRESET, "net reset"), {N, R}),
        (TimeoutError(), {N, T}),
        (OSError(errno.ETIMEDOUT, "timed out"), {N, T}),
        (OSError(errno.EAGAIN, "try again"), {T}),
        (OSError(errno.EWOULDBLOCK, "would block"), {T}),
        (BlockingIOError(), {T}),
        (OSError(errno.EINTR, "interrupted"), {T}),
        (InterruptedError(), {T}),
        (OSError(errno.ENOBUFS, "no buffer space"), {N, T}),
        (asyncio.IncompleteReadError(b"par", 10), {N, C}),
        (EOFError(), {C}),
        (OSError(errno.ENOTCONN, "not connected"), {N, C}),
        (OSError(errno.EBADF, "bad fd"), {C}),
        (ConnectionRefusedError(), {N}),
        (OSError(errno.EHOSTUNREACH, "no route"), {N}),
        (OSError(errno.ENETUNREACH, "unreachable"), {N}),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), {N, C}),
        (ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed"), {N, C}),
        (ssl.SSLWantReadError(2, "want read"), {N, T}),
        (ssl.SSLWantWriteError(3, "want write"), {N, T}),
        (ssl.SSLSyscallError(5, "syscall"), {N, R}),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), {N}),
        (ssl.SSLError(1, "handshake failure"), {N}),
        # An SSL_ERROR_* code is not a POSIX errno: 4 is not EINTR here.
        (ssl.SSLError(4, "x509 lookup"), {N}),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), {N, T}),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), {N}),
        (socket.herror(1, "Unknown host"), {N}),
        (OSError(errno.ENOENT, "No such file"), set()),
        (OSError("timed out"), set()),
        (ValueError("x"), set()),
        (asyncio.CancelledError(), set()),
        (KeyboardInterrupt(), set()),
    ],
    ids=lambda v: repr(v) if isinstance(v, BaseException) else None,
)
def test_builtin_exceptions_are_classified_by_type_and_errno(exc: BaseException, expected: set[str]) -> None:
    assert kinds(exc) == expected
    assert is_retriable_error(exc) is bool(expected & {T, R, C})
    assert not is_service_error(exc)


@pytest.mark.parametrize(
    "message",
    ["connection reset by peer", "broken pipe", "i/o timeout", "use of closed network connection", "EOF"],
)
def test_message_text_is_never_used(message: str) -> None:
    assert kinds(RuntimeError(message)) == set()
    assert kinds(Exception(message)) == set()
    assert not is_retriable_error(RuntimeError(message))


def test_predicates_accept_none() -> None:
    for predicate in (*PREDICATES.values(), is_service_error, is_retriable_error, is_handshake_refused_error):
        assert predicate(None) is False


# --- chains ---------------------------------------------------------------------------------------------


def test_explicit_cause_chain_is_walked() -> None:
    exc = raised_from(RuntimeError("write failed"), raised_from(ValueError("inner"), BrokenPipeError()))
    assert kinds(exc) == {N, R}


def test_implicit_context_chain_is_walked() -> None:
    exc = raised_during(RuntimeError("cleanup failed"), asyncio.IncompleteReadError(b"", 4))
    assert exc.__context__ is not None
    assert kinds(exc) == {N, C}


def test_suppressed_context_is_not_walked() -> None:
    exc = raised_during(raised_from(RuntimeError("clean"), None), TimeoutError())
    assert exc.__context__ is not None
    assert exc.__suppress_context__
    assert kinds(exc) == set()


def test_explicit_cause_hides_the_context_like_a_traceback() -> None:
    exc = raised_during(raised_from(RuntimeError("outer"), ValueError("the real cause")), TimeoutError())
    assert isinstance(exc.__context__, TimeoutError)
    assert not is_temporary_error(exc)


def test_cycles_terminate() -> None:
    a, b, c = RuntimeError("a"), RuntimeError("b"), RuntimeError("c")
    a.__cause__, b.__cause__, c.__cause__ = b, c, a
    assert kinds(a) == set()
    c.__context__ = TimeoutError()  # not shown: c has a __cause__
    assert kinds(a) == set()
    self_loop = ValueError("me")
    self_loop.__context__ = self_loop
    assert kinds(self_loop) == set()
    looped_reset = ConnectionResetError()
    looped_reset.__cause__ = a
    b.__cause__ = looped_reset
    assert kinds(a) == {N, R}


def test_wrapped_errors_are_found_anywhere_in_a_chain() -> None:
    network = NetworkError(TimeoutError(), peer_id="p")
    assert is_network_error(raised_from(RuntimeError("x"), network))
    service = ServiceError(ValueError("bad"), "discovery", "get_peer_id")
    assert is_service_error(raised_during(KeyError("k"), service))
    assert not is_network_error(service)
    # A wrapper re-raised from something else still answers for its own cause.
    rechained = raised_from(NetworkError(BrokenPipeError()), ValueError("other"))
    assert is_connection_reset_error(rechained)


def test_go_aliases_are_exported_from_the_root() -> None:
    assert vpn_packet.IsNetworkError is is_network_error
    assert vpn_packet.IsServiceError is is_service_error
    assert vpn_packet.IsTemporaryError is is_temporary_error
    assert vpn_packet.IsConnectionResetError is is_connection_reset_error
    assert vpn_packet.IsStreamClosedError is is_stream_closed_error


def test_retriable_attribute_decides_for_its_own_exception() -> None:
    assert is_retriable_error(QueueFullError("k", 1))
    assert not is_retriable_error(raised_from(PeerNotFoundError("10.0.0.1"), TimeoutError()))

    class Flaky(Exception):
        retriable = True

    class Fatal(OSError):
        retriable = False

    assert is_retriable_error(Flaky())
    assert not is_retriable_error(Fatal(errno.ECONNRESET, "reset, but told not to retry"))
    assert is_connection_reset_error(Fatal(errno.ECONNRESET, "reset"))


# --- registration hook ----------------------------------------------------------------------------------


class QuicReset(Exception):
    pass


class QuicResetSubclass(QuicReset):
    pass


@pytest.fixture
def quic_registered() -> Iterator[None]:
    assert register_error_kind(QuicReset, network=True, connection_reset=True) is QuicReset
    yield
    unregister_error_kind(QuicReset)


@pytest.mark.usefixtures("quic_registered")
def test_registered_types_and_subclasses_are_classified() -> None:
    assert kinds(QuicReset()) == {N, R}
    assert kinds(QuicResetSubclass()) == {N, R}
    assert kinds(raised_from(RuntimeError("x"), QuicReset())) == {N, R}
    assert is_retriable_error(QuicReset())
    assert NetworkError(QuicReset()).connection_reset


def test_registration_adds_kinds_and_can_be_undone() -> None:
    assert kinds(QuicReset()) == set()
    register_error_kind(QuicReset, temporary=True)
    register_error_kind(EOFError, service=True)  # added to the built-in rule, not replacing it
    try:
        assert kinds(QuicReset()) == {T}
        assert kinds(EOFError()) == {C}
        assert is_service_error(EOFError())
    finally:
        unregister_error_kind(QuicReset)
        unregister_error_kind(EOFError)
    assert kinds(QuicReset()) == set()
    assert not is_service_error(EOFError())
    unregister_error_kind(QuicReset)  # no error when absent


def test_register_rejects_non_exception_types() -> None:
    with pytest.raises(TypeError):
        register_error_kind(int, temporary=True)  # type: ignore[type-var]


# --- property: the walk agrees with an independent reachability computation -----------------------------

POOL_KINDS: list[tuple[type[BaseException], set[str]]] = [
    (ValueError, set()),
    (TimeoutError, {N, T}),
    (ConnectionResetError, {N, R}),
    (EOFError, {C}),
    (RuntimeError, set()),
]


Link = tuple[int | None, int | None, bool]  # __cause__ index, __context__ index, __suppress_context__


@st.composite
def exception_graphs(draw: st.DrawFn) -> tuple[list[int], list[Link]]:
    """Exceptions of random kinds, linked at random (cycles and self-loops included)."""
    types = draw(st.lists(st.integers(0, len(POOL_KINDS) - 1), min_size=1, max_size=8))
    index = st.none() | st.integers(0, len(types) - 1)
    links = draw(st.lists(st.tuples(index, index, st.booleans()), min_size=len(types), max_size=len(types)))
    return types, links


@given(exception_graphs())
def test_walk_matches_traceback_reachability(graph: tuple[list[int], list[Link]]) -> None:
    types, links = graph
    nodes = [POOL_KINDS[t][0]() for t in types]
    for node, (cause, context, suppress) in zip(nodes, links, strict=True):
        node.__cause__ = None if cause is None else nodes[cause]
        node.__context__ = None if context is None else nodes[context]
        node.__suppress_context__ = suppress

    def reachable(start: int) -> set[int]:
        seen, todo = set(), [start]
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            cause, context, suppress = links[i]
            if cause is not None:
                todo.append(cause)
            elif context is not None and not suppress:
                todo.append(context)
        return seen

    for start, node in enumerate(nodes):
        expected: set[str] = set()
        for i in reachable(start):
            expected |= POOL_KINDS[types[i]][1]
        assert kinds(node) == expected
