"""An NBD server: serves one Backend on a Unix socket and/or TCP, many connections at once.

One thread per connection.  Requests come in runs: a client with a deep queue sends many
READs (or WRITEs) back to back, and the C parser (rram._ext._nbdwire.RequestRun) takes every
consecutive plain READ or WRITE of whole 4 KiB blocks already in the receive buffer in one
call.  When the backend offers a request path, the connection runs in C (rram._ext._nbdserve:
recv, parse, the store's tables, the replies packed and sent, no GIL), for single requests (the
kernel's swap I/O, mostly: READs and WRITEs of a block or a few) as for runs, and comes back
here for anything else; a request that path declines, and the rest of its run, are served on
the Python path.  There (and without a request path) a run is served with one backend call
(one store lock, one LZ4 batch) and one send for all its replies, packed in C.  Everything
else (FLUSH, TRIM, WRITE_ZEROES, unaligned or flagged requests, protocol errors) goes through
the sans-IO parser one request at a time, after the run before it, so a FLUSH follows the
writes before it and a READ sees every earlier WRITE.  Buffers are allocated once per
connection.  Several connections run in parallel (NBD_FLAG_CAN_MULTI_CONN: every connection
sees the same backend, and FLUSH/FUA go to the shared store).  A client that breaks the
protocol is disconnected; the others are not affected.

With ``tls`` (an ssl.SSLContext, rram.tls.server_context) every connection must negotiate
NBD_OPT_STARTTLS first (the spec's FORCEDTLS mode); the TLS handshake runs in the
connection's thread under ``handshake_timeout``.  A TLS connection is served on the Python
path (runs and one-by-one requests, with Python's ssl doing the record layer): the C loop
reads and writes the raw socket, which after STARTTLS carries ciphertext.
"""
from __future__ import annotations

import ctypes
import logging
import os
import selectors
import socket
import ssl
import threading
import time

from ... import errors
from ... import tls as T
from ..._ext._nbdwire import RequestRun
from ...units import PAGE_SIZE

try:  # built with the native codec only
    from ..._ext._nbdserve import LOOP_DECLINED, LOOP_EOF, LOOP_RUN, LoopState, serve_loop
except ImportError:  # pragma: no cover - a build without liblz4
    serve_loop = None
from . import protocol as P
from .backend import Backend

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
#: how long a connection polls its socket without blocking before it sleeps in recv.  A client
#: answered a moment ago usually sends again within tens of microseconds; sleeping instead
#: costs a wake-up across CPUs (30-70 us on this kind of machine) per request.  The poll
#: only runs right after a reply, so an idle connection costs nothing; in the C loop it runs
#: only while it catches requests (LoopState, the adaptive spin), unless ``adaptive_spin`` is off.
DEFAULT_SPIN_US = 50
#: pages one run may hold: bounds the run's buffers (1 MiB of data) and a reply's latency
MAX_BATCH_PAGES = 256
_MCL_CURRENT = 1
_MCL_FUTURE = 2


def lock_all_memory() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE): a server backing swap must never be swapped out."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(_MCL_CURRENT | _MCL_FUTURE) != 0:
        err = ctypes.get_errno()
        raise errors.RramError(f"mlockall failed: {os.strerror(err)} (errno {err}); run as root or raise "
                               f"RLIMIT_MEMLOCK (ulimit -l), or pass --no-mlock when not backing swap")


def _nbd_error(exc: BaseException) -> int:
    if isinstance(exc, P.RequestError):
        return exc.error
    if isinstance(exc, errors.StoreFullError):
        return P.NBD_ENOSPC
    return P.NBD_EIO


class NBDServer:
    """Serve ``backend`` as one NBD export.

    with NBDServer(backend, export_name="rram") as server:
        server.listen_unix("/run/rram.sock"); server.listen_tcp("127.0.0.1", 10809)
        server.start()
    """

    def __init__(self, backend: Backend, *, export_name: str = "", description: str = "rram remote memory",
                 min_block: int = 1, max_block: int = P.DEFAULT_MAX_BLOCK,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, spin_us: float = DEFAULT_SPIN_US,
                 adaptive_spin: bool = True, c_requests: bool = True, tls: ssl.SSLContext | None = None):
        self.backend = backend
        self.tls = tls  # None: plaintext; else TLS required on every connection
        # (RequestPath, key of block 0): single requests in C; None: all in Python
        self._c_path = backend.request_path() if c_requests and serve_loop is not None else None
        self.export = P.Export(name=export_name, size=backend.size, description=description,
                               min_block=min_block, max_block=max_block)
        self.handshake_timeout = handshake_timeout
        if spin_us < 0:
            raise errors.ConfigError(f"NBD spin must be >= 0 microseconds, got {spin_us}")
        self._spin_ns = int(spin_us * 1000)
        self._adaptive_spin = adaptive_spin
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        #: each connection's thread and its socket (the TLS one once STARTTLS is through)
        self._clients: dict[threading.Thread, socket.socket] = {}
        self._accept_thread: threading.Thread | None = None
        self._closed = False
        #: the C loops' states of live connections (LoopState: counters C keeps), and what ended
        #: connections' loops counted
        self._loops: set = set()
        self._loop_totals: dict[str, int] = {}
        self._counts = {"connections": 0, "disconnected_bad_clients": 0, "requests": 0, "errors": 0,
                         "runs": 0, "run_requests": 0, "c_requests": 0, "c_declined": 0, "tls_connections": 0,
                         "tls_failures": 0}

    @property
    def counters(self) -> dict[str, int]:
        """Requests served (in C and in Python), runs, errors, connections...; the C loops'
        counters (c_requests and c_declined: single requests; c_runs served whole, c_run_requests,
        c_run_declined: runs C served; the spin's: spin_hits, spin_misses, spin_probes, spin_us
        polled, sleeps in recv) are current while their connections wait.  ``runs`` and
        ``run_requests`` count the Python batch path's."""
        with self._lock:
            out = dict(self._counts)
            for key, value in self._loop_totals.items():
                out[key] = out.get(key, 0) + value
            for state in self._loops:
                for key, value in state.counters().items():
                    out[key] = out.get(key, 0) + value
        out["requests"] += out.get("c_requests", 0) + out.get("c_run_requests", 0)
        return out

    # -- listening ------------------------------------------------------------------------------

    def listen_unix(self, path: str) -> str:
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self._unix_paths.append(path)
        self._add_listener(sock)
        return path

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        self._add_listener(sock)
        return sock.getsockname()[:2]

    def _add_listener(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._listeners.append(sock)
        self._selector.register(sock, selectors.EVENT_READ)

    def start(self) -> None:
        if not self._listeners:
            raise errors.ConfigError("NBD server: listen_unix() or listen_tcp() before start()")
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accept_thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_r:
                    return
                try:
                    sock, peer = key.fileobj.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    log.warning("nbd accept failed: %s", exc)
                    continue
                self._spawn(sock, peer or "unix")

    def _spawn(self, sock: socket.socket, peer) -> None:
        sock.setblocking(True)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(target=self._serve, args=(sock, peer), name=f"nbd-conn-{peer}", daemon=True)
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._clients[thread] = sock
            self._counts["connections"] += 1
        thread.start()

    # -- one connection -------------------------------------------------------------------------

    def _serve(self, sock: socket.socket, peer) -> None:
        conn = P.ServerConnection(self.export, tls=self.tls is not None)
        run: RequestRun | None = None  # made at Ready, once the reply format is known
        reply = bytearray(0)  # the one-by-one READ path's buffer, grown on demand
        c_path = self._c_path  # None once TLS is on: the C loop speaks to the raw socket
        state = None  # the C loop's LoopState, made with ``run``
        started = time.monotonic()
        try:
            sock.settimeout(self.handshake_timeout)
            sock.sendall(conn.data_to_send())
            while True:
                if run is not None and c_path is not None and (where := conn.transmission_buffer()):
                    why = self._serve_in_c(conn, sock, run, state, where)
                    if why == LOOP_EOF:
                        log.debug("nbd client %s went away", peer)
                        return
                    if why == LOOP_DECLINED:  # one request, which the Python path serves
                        reply = self._handle(conn, sock, P.Request(*run.request(0)), reply)
                        run.clear()
                        continue
                    if why == LOOP_RUN:  # the rest of a run, from the request C declined
                        reply = self._serve_run(conn, sock, run, reply)
                        continue
                    # LOOP_PARSER: the head of the buffer is for the Python parser below
                elif run is not None and conn.take_run(run):
                    reply = self._serve_run(conn, sock, run, reply)
                    continue
                event = conn.next_event()
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                if event is P.NEED_DATA:
                    n = self._recv(sock, conn.get_buffer(), run is not None and not conn.tls_active)
                    if n == 0:
                        log.debug("nbd client %s went away", peer)
                        return
                    conn.buffer_updated(n)
                elif type(event) is P.Request:
                    reply = self._handle(conn, sock, event, reply)
                elif isinstance(event, P.StartTLS):
                    sock, c_path = self._start_tls(sock, peer, started), None
                    conn.tls_started()
                elif isinstance(event, P.Ready):
                    sock.settimeout(None)  # an idle block device is normal
                    run = RequestRun(MAX_BATCH_PAGES, conn.structured)
                    if c_path is not None:
                        state = LoopState(self._spin_ns, self._adaptive_spin)
                        with self._lock:
                            self._loops.add(state)
                    log.info("nbd client %s: transmission (structured replies: %s)", peer,
                             event.structured_replies)
                elif isinstance(event, P.Closed):
                    log.debug("nbd client %s: %s", peer, event.reason)
                    return
        except (P.StreamError, errors.ProtocolError, errors.AuthError) as exc:
            self._counts["disconnected_bad_clients"] += 1
            log.warning("nbd client %s disconnected: %s", peer, exc)
        except (TimeoutError, OSError, errors.ConnectionLost) as exc:
            log.info("nbd client %s: connection ended: %s", peer, exc)
        finally:
            with self._lock:
                self._clients.pop(threading.current_thread(), None)
                if state is not None:
                    self._loops.discard(state)
                    for key, value in state.counters().items():
                        self._loop_totals[key] = self._loop_totals.get(key, 0) + value
            sock.close()

    def _start_tls(self, sock: socket.socket, peer, started: float) -> ssl.SSLSocket:
        """The server side of the TLS handshake after STARTTLS, within the handshake timeout."""
        try:
            tls_sock = T.accept(self.tls, sock, started + self.handshake_timeout)
        except errors.RramError:
            self._counts["tls_failures"] += 1
            raise
        tls_sock.settimeout(self.handshake_timeout)
        with self._lock:
            self._clients[threading.current_thread()] = tls_sock  # close() shuts this one
            self._counts["tls_connections"] += 1
        log.info("nbd client %s: TLS on (%s, client %s)", peer, tls_sock.version(), T.peer_name(tls_sock))
        return tls_sock

    def _serve_in_c(self, conn: P.ServerConnection, sock: socket.socket, run: RequestRun, state, where) -> int:
        """Run the connection in C (serve_loop) until something needs Python; why it returned.
        C counts what it serves in ``state``, so it sleeps in recv without coming back here."""
        path, key_base = self._c_path
        buf, start, end = where
        e = self.export
        start, end, why = serve_loop(run, path, key_base, sock.fileno(), buf, start, end,
                                     e.size, e.max_block, e.min_block, state)
        conn.consumed(start, end)
        return why

    def _recv(self, sock: socket.socket, buf: memoryview, spin: bool) -> int:
        """recv_into ``buf``, polling for up to spin_us first when ``spin`` (requests flowing on a
        plain socket: TLS has no MSG_DONTWAIT)."""
        if spin and self._spin_ns:
            deadline = time.perf_counter_ns() + self._spin_ns
            while True:
                try:
                    return sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if time.perf_counter_ns() >= deadline:
                        break
        return sock.recv_into(buf)

    def _serve_run(self, conn: P.ServerConnection, sock: socket.socket, run: RequestRun,
                   reply: bytearray) -> bytearray:
        """Serve a parsed run of READs or WRITEs with one backend call and one send."""
        if run.nreq == 1:  # nothing to amortise: the one-by-one path is the fastest
            reply = self._handle(conn, sock, P.Request(*run.request(0)), reply)
            run.clear()
            return reply
        n = run.npages
        try:
            if run.command == P.NBD_CMD_READ:
                self.backend.read_pages(run.pages[:n], run.data[:n * PAGE_SIZE])
                out = run.read_replies()
            else:
                self.backend.write_pages(run.pages[:n], run.data[:n * PAGE_SIZE])
                if run.fua:
                    self.backend.flush()
                out = run.write_replies()
        except OSError as exc:
            if isinstance(exc, (BrokenPipeError, ConnectionError, socket.timeout)):
                raise
            return self._run_failed(conn, sock, run, exc, reply)
        except Exception as exc:  # noqa: BLE001 - retried one by one, so each gets its own reply
            return self._run_failed(conn, sock, run, exc, reply)
        sock.sendall(out)
        self._counts["requests"] += run.nreq
        self._counts["runs"] += 1
        self._counts["run_requests"] += run.nreq
        run.clear()
        return reply

    def _run_failed(self, conn, sock, run: RequestRun, exc: Exception, reply: bytearray) -> bytearray:
        log.debug("nbd run of %d requests failed (%s); serving them one by one", run.nreq, exc)
        for k in range(run.nreq):
            reply = self._handle(conn, sock, P.Request(*run.request(k)), reply)
        run.clear()
        return reply

    def _handle(self, conn: P.ServerConnection, sock: socket.socket, req: P.Request, reply: bytearray) -> bytearray:
        self._counts["requests"] += 1
        backend = self.backend
        cmd = req.command
        try:
            if cmd == P.NBD_CMD_READ:
                hsz = conn.read_header_size
                if len(reply) < hsz + req.length:
                    reply = bytearray(hsz + req.length)  # grows once, to at most max_block
                view = memoryview(reply)
                backend.read(req.offset, req.length, view[hsz:hsz + req.length])
                conn.pack_read_header(view, req)
                sock.sendall(view[:hsz + req.length])
                return reply
            if cmd == P.NBD_CMD_WRITE:
                backend.write(req.offset, req.data, req.fua)
            elif cmd == P.NBD_CMD_FLUSH:
                backend.flush()
            elif cmd == P.NBD_CMD_TRIM:
                backend.trim(req.offset, req.length)
                if req.fua:
                    backend.flush()
            elif cmd == P.NBD_CMD_WRITE_ZEROES:
                backend.zero(req.offset, req.length, bool(req.flags & P.NBD_CMD_FLAG_NO_HOLE))
                if req.fua:
                    backend.flush()
            conn.reply(req)
        except OSError as exc:
            if isinstance(exc, (BrokenPipeError, ConnectionError, socket.timeout)):
                raise  # the client's socket, not the backend
            self._failed(conn, req, exc)
        except Exception as exc:  # noqa: BLE001 - any backend failure becomes an NBD error reply
            self._failed(conn, req, exc)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        return reply

    def _failed(self, conn: P.ServerConnection, req: P.Request, exc: Exception) -> None:
        self._counts["errors"] += 1
        err = _nbd_error(exc)
        if isinstance(exc, (errors.RramError, OSError)):
            log.warning("nbd command %d at %d+%d failed: %s", req.command, req.offset, req.length, exc)
        else:
            log.exception("nbd command %d at %d+%d failed unexpectedly", req.command, req.offset, req.length)
        conn.reply(req, err, str(exc))

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._clients)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, disconnect every client, wait for their threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients.items())
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        for sock in self._listeners:
            self._selector.unregister(sock)
            sock.close()
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for _, sock in clients:
            T.shutdown(sock)
        for thread, _ in clients:
            thread.join(timeout)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
