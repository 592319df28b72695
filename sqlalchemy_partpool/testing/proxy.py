"""A loopback TCP proxy that injects network faults between a client and PostgreSQL.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every connection to one
target.  Its mode can be switched at any time, from any thread, and applies to
connections already open as well as to new ones:

=================  ================================================================
``heal()``         pass traffic unchanged (and clear any latency)
``set_latency(s)`` pass traffic, each chunk delayed by ``s`` seconds in each direction
``refuse()``       close the listening socket: the kernel refuses new connections
                   (``ECONNREFUSED``); open connections keep working
``reset()``        RST every open connection on both sides, and every new one
``reset_once()``   RST the open connections only; the mode is left as it was
``blackhole()``    forward nothing either way and close nothing, like a firewall
                   that drops packets; new connections are accepted, then hang
=================  ================================================================

Blackholed bytes are not thrown away: they wait unread in the kernel's socket
buffers, the way a sender keeps unacknowledged segments, so after ``heal()`` a
stalled query completes, unless its client gave up first.

Each connection is served by one thread that multiplexes both sockets with
:mod:`selectors` and a wake-up socket pair, so mode changes and :meth:`FaultProxy.stop`
take effect at once.  All threads are daemons named ``partpool-proxy-<port>-*``.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import selectors
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Protocol, TypeAlias, TypeVar

from sqlalchemy.engine import URL, make_url

from .postgres import HarnessError, Server, free_port

__all__ = ["FaultProxy", "ProxyFactory", "ProxyMode", "ProxyTarget"]

logger = logging.getLogger("sqlalchemy_partpool.testing")

# Longest a thread sleeps before re-checking its state when nothing wakes it.
_POLL = 0.25
_CHUNK = 65536
# Stop reading from one side while this much is queued for the other side.
_MAX_QUEUED = 1 << 20

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE


class ProxyMode(enum.Enum):
    """What a :class:`FaultProxy` does with traffic."""

    PASS = "pass"  # noqa: S105  (a mode, not a password)
    REFUSE = "refuse"
    RESET = "reset"
    BLACKHOLE = "blackhole"


#: What the ``fault_proxy`` fixture accepts as a target.
ProxyTarget: TypeAlias = Server | tuple[str, int] | str | URL


def _abort(sock: socket.socket | None) -> None:
    """Close ``sock`` so that the peer gets an RST rather than a FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        # Linger on with a zero timeout: close() discards unsent data and resets.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def _poke(sock: socket.socket) -> None:
    # Full buffer (already poked) or closed (thread gone): both fine to ignore.
    with contextlib.suppress(OSError):
        sock.send(b"\0")


def _set_events(sel: selectors.BaseSelector, sock: socket.socket, events: int) -> None:
    """Make ``sel`` watch ``sock`` for exactly ``events`` (0: not at all)."""
    try:
        key: selectors.SelectorKey | None = sel.get_key(sock)
    except KeyError:
        key = None
    if events == 0:
        if key is not None:
            sel.unregister(sock)
    elif key is None:
        sel.register(sock, events)
    elif key.events != events:
        sel.modify(sock, events)


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    return r, w


class _Direction:
    """Bytes travelling one way, each chunk stamped with when it may be delivered."""

    __slots__ = ("eof", "pending", "queue", "shut")

    def __init__(self) -> None:
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.pending = 0
        self.eof = False  # the source sent FIN
        self.shut = False  # FIN passed on to the destination

    def push(self, data: bytes, deliver_at: float) -> None:
        self.queue.append((deliver_at, data))
        self.pending += len(data)

    def due(self, now: float) -> bool:
        return bool(self.queue) and self.queue[0][0] <= now

    def next_due(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def flush(self, dst: socket.socket, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            deliver_at, data = self.queue[0]
            try:
                sent = dst.send(data)
            except (BlockingIOError, InterruptedError):
                return
            self.pending -= sent
            if sent < len(data):
                self.queue[0] = (deliver_at, data[sent:])
                return
            self.queue.popleft()


class _Connection:
    """One proxied connection and the thread that serves it."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, seq: int) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.reset_requested = False
        self.done = threading.Event()
        self._wake_r, self._wake_w = _wake_pair()
        self.to_upstream = _Direction()
        self.to_client = _Direction()
        self.thread = threading.Thread(
            target=self._run, name=f"partpool-proxy-{proxy.port}-conn-{seq}", daemon=True
        )

    def wake(self) -> None:
        _poke(self._wake_w)

    def _run(self) -> None:
        graceful = False
        try:
            graceful = self._pump()
        except OSError as exc:
            # A reset or broken pipe on one side: pass it on as a reset.
            logger.debug("%s: %s", self.thread.name, exc)
        except Exception:
            logger.exception("%s failed", self.thread.name)
        finally:
            for sock in (self.client, self.upstream):
                if graceful and sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()
                else:
                    _abort(sock)
            with contextlib.suppress(OSError):
                self._wake_r.close()
            with contextlib.suppress(OSError):
                self._wake_w.close()
            self.proxy._forget(self)
            self.done.set()

    def _must_abort(self, mode: ProxyMode, stopping: bool) -> bool:
        return stopping or self.reset_requested or mode is ProxyMode.RESET

    def _pump(self) -> bool:
        """Forward until both sides are done (True) or the connection must be reset (False)."""
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, _R)
            while True:
                mode, latency, stopping = self.proxy._state()
                if self._must_abort(mode, stopping):
                    return False
                if mode is ProxyMode.BLACKHOLE:
                    # Watch nothing but the wake-up socket: unread bytes stay in
                    # the kernel, and queued ones stay queued, until healed.
                    _set_events(sel, self.client, 0)
                    if self.upstream is not None:
                        _set_events(sel, self.upstream, 0)
                    if sel.select(_POLL):
                        _drain(self._wake_r)
                    continue
                if self.upstream is None:
                    try:
                        self.upstream = self.proxy._connect_upstream()
                    except OSError as exc:
                        logger.debug("%s: upstream connect failed: %s", self.thread.name, exc)
                        return False
                upstream = self.upstream
                if self._step(sel, upstream, latency):
                    return True
        finally:
            sel.close()

    def _step(self, sel: selectors.BaseSelector, upstream: socket.socket, latency: float) -> bool:
        """One select round; return True once both directions are closed cleanly."""
        now = time.monotonic()
        timeout = _POLL
        ev_client = ev_upstream = 0
        up, down = self.to_upstream, self.to_client
        if not up.eof and up.pending < _MAX_QUEUED:
            ev_client |= _R
        if not down.eof and down.pending < _MAX_QUEUED:
            ev_upstream |= _R
        for direction, is_upstream in ((up, True), (down, False)):
            if direction.due(now):
                if is_upstream:
                    ev_upstream |= _W
                else:
                    ev_client |= _W
            elif (at := direction.next_due()) is not None:
                # Sleep exactly until the next delayed chunk is due.
                timeout = min(timeout, max(0.0, at - now))
        _set_events(sel, self.client, ev_client)
        _set_events(sel, upstream, ev_upstream)
        ready = sel.select(timeout)

        # Re-check after waiting, so a blackhole/reset issued meanwhile holds
        # back this round's bytes instead of letting them slip through.
        mode, latency, stopping = self.proxy._state()
        if self._must_abort(mode, stopping) or mode is ProxyMode.BLACKHOLE:
            for key, _ in ready:
                if key.fileobj is self._wake_r:
                    _drain(self._wake_r)
            return False

        for key, events in ready:
            sock = key.fileobj
            if sock is self._wake_r:
                _drain(self._wake_r)
                continue
            assert isinstance(sock, socket.socket)
            if events & _R:
                direction = up if sock is self.client else down
                try:
                    data = sock.recv(_CHUNK)
                except (BlockingIOError, InterruptedError):
                    data = None
                if data:
                    direction.push(data, time.monotonic() + latency)
                elif data is not None:
                    direction.eof = True
        now = time.monotonic()
        up.flush(upstream, now)
        down.flush(self.client, now)

        # Pass a FIN on once everything before it has been delivered.
        for direction, dst in ((up, upstream), (down, self.client)):
            if direction.eof and not direction.queue and not direction.shut:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                direction.shut = True
        return up.shut and down.shut


_Self = TypeVar("_Self", bound="FaultProxy")


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1 whose faults can be switched at run time.

    Typical use::

        with FaultProxy(server.host, server.port) as proxy:
            engine = create_engine(proxy.url_for(server.url("db1")))
            proxy.blackhole()
            ...
            proxy.heal()

    :param target_host: host the proxy forwards to.
    :param target_port: port the proxy forwards to.
    :param listen_host: loopback address to listen on.
    :param port: port to listen on; a free one when omitted.
    :param connect_timeout: seconds allowed for connecting to the target; when
        that fails the client connection is reset.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        port: int | None = None,
        connect_timeout: float = 2.0,
    ) -> None:
        self._target = (target_host, target_port)
        self._host = listen_host
        self._port = port
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._mode = ProxyMode.PASS
        self._latency = 0.0
        self._want_listen = True
        self._listen_gen = 0
        self._applied_gen = 0
        self._listen_error: OSError | None = None
        self._listener: socket.socket | None = None
        self._conns: set[_Connection] = set()
        self._total = 0
        self._seq = 0
        self._stopping = False
        self._started = False
        self._acceptor: threading.Thread | None = None
        self._wake_r, self._wake_w = _wake_pair()

    # -- properties ----------------------------------------------------------

    @property
    def host(self) -> str:
        """Address the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """Port the proxy listens on (known once started)."""
        if self._port is None:
            raise HarnessError("FaultProxy has no port until start()")
        return self._port

    @property
    def target(self) -> tuple[str, int]:
        """``(host, port)`` the proxy forwards to."""
        return self._target

    @property
    def mode(self) -> ProxyMode:
        """The current mode."""
        return self._mode

    @property
    def latency(self) -> float:
        """Delay in seconds added to each chunk in each direction."""
        return self._latency

    @property
    def active_connections(self) -> int:
        """Connections currently open through the proxy."""
        with self._lock:
            return len(self._conns)

    @property
    def total_connections(self) -> int:
        """Connections accepted since start, including those reset at once."""
        with self._lock:
            return self._total

    def url_for(self, server_url: str | URL) -> str:
        """Rewrite a SQLAlchemy URL to go through this proxy.

        Everything but the host and port is kept, password included.

        :param server_url: URL of the proxied server.
        """
        url = make_url(server_url).set(host=self._host, port=self.port)
        return url.render_as_string(hide_password=False)

    # -- lifecycle -----------------------------------------------------------

    def start(self: _Self) -> _Self:
        """Bind the listening socket and start forwarding; returns ``self``."""
        with self._lock:
            if self._started:
                raise HarnessError("FaultProxy.start() called twice")
            self._started = True
        if self._port is None:
            # free_port() only probes; another process may bind in between.
            for attempt in range(5):
                self._port = free_port(self._host)
                try:
                    self._listener = self._bind()
                    break
                except OSError:
                    if attempt == 4:
                        raise
        else:
            self._listener = self._bind()
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"partpool-proxy-{self._port}-accept", daemon=True
        )
        self._acceptor.start()
        logger.info("fault proxy 127.0.0.1:%s -> %s:%s started", self._port, *self._target)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every connection and the listener, and join the threads.

        Connections are reset.  Safe to call more than once.

        :param timeout: seconds to wait for all threads in total.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            conns = list(self._conns)
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        _poke(self._wake_w)
        for conn in conns:
            conn.wake()
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [c.thread.name for c in conns if c.thread.is_alive()]
        if self._acceptor is not None and self._acceptor.is_alive():
            stuck.append(self._acceptor.name)
        if stuck:
            logger.warning("fault proxy threads still running after stop(): %s", stuck)
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        if self._listener is not None and (self._acceptor is None or not self._acceptor.is_alive()):
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        logger.info("fault proxy on port %s stopped", self._port)

    def __enter__(self: _Self) -> _Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self._host}:{self._port} -> {self._target[0]}:{self._target[1]}, "
            f"{self._mode.value}, latency={self._latency})"
        )

    # -- modes ---------------------------------------------------------------

    def heal(self) -> None:
        """Pass traffic unchanged again: no latency, listening on the same port."""
        with self._lock:
            self._mode = ProxyMode.PASS
            self._latency = 0.0
        self._set_listening(True)
        self._wake_all()

    def set_latency(self, seconds: float) -> None:
        """Pass traffic, delaying each chunk by ``seconds`` in each direction.

        A query round trip therefore takes at least ``2 * seconds`` longer.
        Chunks already queued keep the delay they were given.

        :param seconds: the delay; 0 for none.
        """
        if seconds < 0:
            raise ValueError("latency must be >= 0")
        with self._lock:
            self._mode = ProxyMode.PASS
            self._latency = float(seconds)
        self._set_listening(True)
        self._wake_all()

    def refuse(self) -> None:
        """Refuse new connections at the TCP level; open ones keep working.

        The listening socket is closed, so the kernel answers new connection
        attempts with an RST (``Connection refused``).  :meth:`heal` listens
        again on the same port.
        """
        with self._lock:
            self._mode = ProxyMode.REFUSE
        self._set_listening(False)

    def reset(self) -> None:
        """RST every open connection (both sides), and each new one while in this mode.

        Returns once the open connections are closed.
        """
        with self._lock:
            self._mode = ProxyMode.RESET
        self._set_listening(True)
        self._reset_open()

    def reset_once(self) -> None:
        """RST every open connection (both sides) but leave the mode as it is.

        Returns once they are closed.
        """
        self._reset_open()

    def blackhole(self) -> None:
        """Stop forwarding in both directions without closing anything.

        New connections are accepted (the kernel completes the handshake) but
        nothing reaches the target; open ones go silent.  Clients see time-outs,
        never errors.  Bytes already sent wait and flow again after :meth:`heal`.
        """
        with self._lock:
            self._mode = ProxyMode.BLACKHOLE
        self._set_listening(True)
        self._wake_all()

    # -- internals -----------------------------------------------------------

    def _state(self) -> tuple[ProxyMode, float, bool]:
        with self._lock:
            return self._mode, self._latency, self._stopping

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Needed to listen again on the same port after refuse() while
            # connections accepted on it are still open or in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _connect_upstream(self) -> socket.socket:
        sock = socket.create_connection(self._target, timeout=self._connect_timeout)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _wake_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.wake()

    def _reset_open(self, timeout: float = 5.0) -> None:
        with self._lock:
            conns = list(self._conns)
            for conn in conns:
                conn.reset_requested = True
        for conn in conns:
            conn.wake()
        deadline = time.monotonic() + timeout
        for conn in conns:
            if not conn.done.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("%s did not close within %ss", conn.thread.name, timeout)

    def _set_listening(self, want: bool, timeout: float = 5.0) -> None:
        """Have the acceptor thread open or close the listener, and wait until it has.

        The acceptor owns the listening socket (closing it under a thread that
        is selecting on it would race), so the change is requested and then
        acknowledged.
        """
        with self._cond:
            if self._want_listen == want and self._applied_gen == self._listen_gen:
                return
            self._want_listen = want
            self._listen_gen += 1
            gen = self._listen_gen
            if self._acceptor is None or self._stopping:
                return  # applied when start() runs, or moot
            _poke(self._wake_w)
            if not self._cond.wait_for(
                lambda: self._applied_gen >= gen or self._stopping, timeout=timeout
            ):
                raise HarnessError("fault proxy acceptor did not respond")
            error, self._listen_error = self._listen_error, None
        if error is not None:
            raise HarnessError(f"cannot listen on {self._host}:{self._port} again: {error}")

    def _apply_listening(self, sel: selectors.BaseSelector) -> None:
        """Called by the acceptor with the lock held."""
        if self._want_listen and self._listener is None:
            try:
                self._listener = self._bind()
            except OSError as exc:
                self._listen_error = exc
                self._want_listen = False
            else:
                sel.register(self._listener, _R)
        elif not self._want_listen and self._listener is not None:
            sel.unregister(self._listener)
            # Pending, not yet accepted connections in the backlog get an RST too.
            self._listener.close()
            self._listener = None
        if self._applied_gen != self._listen_gen:
            self._applied_gen = self._listen_gen
            self._cond.notify_all()

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, _R)
            if self._listener is not None:
                sel.register(self._listener, _R)
            while True:
                with self._lock:
                    if self._stopping:
                        return
                    self._apply_listening(sel)
                for key, _ in sel.select(_POLL):
                    if key.fileobj is self._wake_r:
                        _drain(self._wake_r)
                    else:
                        self._accept_ready()
        except Exception:
            logger.exception("fault proxy acceptor failed")
        finally:
            with self._lock:
                if self._listener is not None:
                    with contextlib.suppress(OSError):
                        self._listener.close()
                    self._listener = None
                self._applied_gen = self._listen_gen
                self._cond.notify_all()
            sel.close()

    def _accept_ready(self) -> None:
        listener = self._listener
        if listener is None:
            return
        for _ in range(64):  # bounded: let the loop re-check state now and then
            try:
                client, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            with self._lock:
                self._total += 1
                mode, stopping = self._mode, self._stopping
                if mode is ProxyMode.RESET or stopping:
                    conn = None
                else:
                    self._seq += 1
                    client.setblocking(False)
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn = _Connection(self, client, self._seq)
                    self._conns.add(conn)
                    # Started under the lock, so stop() never sees (and tries
                    # to join) a thread that has not been started yet.
                    conn.thread.start()
            if conn is None:
                _abort(client)


class ProxyFactory(Protocol):
    """Type of the ``fault_proxy`` fixture: starts a :class:`FaultProxy` in front of a target."""

    def __call__(self, target: ProxyTarget) -> FaultProxy: ...
