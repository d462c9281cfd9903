"""An NBD server: serves one Backend on a Unix socket and/or TCP, many connections at once.

One thread per connection.  A connection parses every request already in its receive buffer
before it blocks in recv, and serves runs of consecutive READs (or WRITEs) of whole 4 KiB
blocks as one batch: one backend call (one store lock, one LZ4 batch) and one send for all
their replies.  Any other command, or a READ/WRITE that is not block-aligned, first runs the
batch queued before it, so a FLUSH follows the writes before it and a READ sees every earlier
WRITE.  Buffers (receive, batch pages, replies) are allocated once per connection.  Several
connections run in parallel (NBD_FLAG_CAN_MULTI_CONN: every connection sees the same backend,
and FLUSH/FUA go to the shared store).  A client that breaks the protocol is disconnected;
the others are not affected.
"""
from __future__ import annotations

import ctypes
import logging
import os
import selectors
import socket
import threading

import numpy as np

from ... import PAGE_SIZE, errors
from . import protocol as P
from .backend import Backend

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 30.0
#: pages one batch may hold: bounds the batch buffers (1 MiB of data) and a reply's latency
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


class _Batch:
    """One connection's run of consecutive READs or WRITEs of whole, aligned 4 KiB blocks.

    The buffers are allocated once per connection: block numbers (uint32), the pages (read
    from or written to the store in one call), and the reply of a READ run (header + data for
    each request, sent with one sendall).  ``reply`` is the single-request path's buffer.
    """

    def __init__(self, header_size: int):
        self.header_size = header_size
        self.pages = np.empty(MAX_BATCH_PAGES, dtype=np.uint32)
        self.data = memoryview(bytearray(MAX_BATCH_PAGES * PAGE_SIZE))
        self._replies = memoryview(bytearray(MAX_BATCH_PAGES * (header_size + PAGE_SIZE)))
        self.reply = bytearray(header_size + PAGE_SIZE)
        self.requests: list[P.Request] = []
        self.command = -1
        self.count = 0  # pages queued
        self.fua = False

    def accepts(self, req: P.Request) -> int | None:
        """The command ``req`` would be batched as (READ, WRITE), or None for the one-by-one path."""
        cmd = req.command
        if cmd != P.NBD_CMD_READ and cmd != P.NBD_CMD_WRITE:
            return None
        if req.offset % PAGE_SIZE or req.length % PAGE_SIZE or req.length > MAX_BATCH_PAGES * PAGE_SIZE:
            return None
        return cmd

    def add(self, req: P.Request, command: int) -> None:
        """Queue ``req``; callers run the batch first when the command differs or room() is False."""
        n = req.length // PAGE_SIZE
        first, at = req.offset // PAGE_SIZE, self.count
        if n == 1:
            self.pages[at] = first
        else:
            self.pages[at:at + n] = np.arange(first, first + n, dtype=np.uint32)
        if command == P.NBD_CMD_WRITE:
            self.data[at * PAGE_SIZE:(at + n) * PAGE_SIZE] = req.data  # its view dies at the next recv
            self.fua = self.fua or bool(req.flags & P.NBD_CMD_FLAG_FUA)
        self.requests.append(req)
        self.command = command
        self.count += n

    def room(self, req: P.Request) -> bool:
        return self.count + req.length // PAGE_SIZE <= MAX_BATCH_PAGES

    def pack_read_replies(self, conn: P.ServerConnection) -> memoryview:
        """Each READ's reply header followed by its pages, back to back; the bytes to send."""
        out, data, hsz = self._replies, self.data, self.header_size
        pos = page = 0
        for req in self.requests:
            conn.pack_read_header(out[pos:], req)
            n = req.length
            out[pos + hsz:pos + hsz + n] = data[page:page + n]
            pos += hsz + n
            page += n
        return out[:pos]

    def clear(self) -> None:
        self.requests.clear()
        self.command = -1
        self.count = 0
        self.fua = False


class NBDServer:
    """Serve ``backend`` as one NBD export.

    with NBDServer(backend, export_name="rram") as server:
        server.listen_unix("/run/rram.sock"); server.listen_tcp("127.0.0.1", 10809)
        server.start()
    """

    def __init__(self, backend: Backend, *, export_name: str = "", description: str = "rram remote memory",
                 min_block: int = 1, max_block: int = P.DEFAULT_MAX_BLOCK,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.backend = backend
        self.export = P.Export(name=export_name, size=backend.size, description=description,
                               min_block=min_block, max_block=max_block)
        self.handshake_timeout = handshake_timeout
        self._listeners: list[socket.socket] = []
        self._unix_paths: list[str] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._lock = threading.Lock()
        self._clients: dict[socket.socket, threading.Thread] = {}
        self._accept_thread: threading.Thread | None = None
        self._closed = False
        self.counters = {"connections": 0, "disconnected_bad_clients": 0, "requests": 0, "errors": 0}

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
            self._clients[sock] = thread
            self.counters["connections"] += 1
        thread.start()

    # -- one connection -------------------------------------------------------------------------

    def _serve(self, sock: socket.socket, peer) -> None:
        conn = P.ServerConnection(self.export)
        batch: _Batch | None = None  # made at Ready, once the reply format is known
        try:
            sock.settimeout(self.handshake_timeout)
            sock.sendall(conn.data_to_send())
            while True:
                event = conn.next_event()
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
                if event is P.NEED_DATA:
                    if batch is not None and batch.count:
                        self._run_batch(conn, sock, batch)  # before recv: write data views the buffer
                    n = sock.recv_into(conn.get_buffer())
                    if n == 0:
                        log.debug("nbd client %s went away", peer)
                        return
                    conn.buffer_updated(n)
                elif type(event) is P.Request:
                    command = batch.accepts(event)
                    if batch.count and (command != batch.command or not batch.room(event)):
                        self._run_batch(conn, sock, batch)  # a run of one command type ends
                    if command is None:
                        batch.reply = self._handle(conn, sock, event, batch.reply)
                    else:
                        batch.add(event, command)
                elif isinstance(event, P.Ready):
                    sock.settimeout(None)  # an idle block device is normal
                    batch = _Batch(conn.read_header_size)
                    log.info("nbd client %s: transmission (structured replies: %s)", peer,
                             event.structured_replies)
                elif isinstance(event, P.Closed):
                    if batch is not None and batch.count:
                        self._run_batch(conn, sock, batch)  # requests before NBD_CMD_DISC are served
                    log.debug("nbd client %s: %s", peer, event.reason)
                    return
        except P.StreamError as exc:
            self.counters["disconnected_bad_clients"] += 1
            log.warning("nbd client %s disconnected: %s", peer, exc)
        except (TimeoutError, OSError) as exc:
            log.info("nbd client %s: connection ended: %s", peer, exc)
        finally:
            with self._lock:
                self._clients.pop(sock, None)
            sock.close()

    def _run_batch(self, conn: P.ServerConnection, sock: socket.socket, batch: _Batch) -> None:
        """Serve the queued run of READs or WRITEs with one store call and one send."""
        requests = batch.requests
        if len(requests) == 1:  # nothing to amortise: the single-request path is the fastest
            batch.reply = self._handle(conn, sock, requests[0], batch.reply)
            batch.clear()
            return
        backend = self.backend
        try:
            if batch.command == P.NBD_CMD_READ:
                backend.read_pages(batch.pages[:batch.count], batch.data[:batch.count * PAGE_SIZE])
            else:
                backend.write_pages(batch.pages[:batch.count], batch.data[:batch.count * PAGE_SIZE])
                if batch.fua:
                    backend.flush()
        except OSError as exc:
            if isinstance(exc, (BrokenPipeError, ConnectionError, socket.timeout)):
                raise
            self._batch_failed(conn, sock, batch, exc)
            return
        except Exception as exc:  # noqa: BLE001 - retried one by one, so each gets its own reply
            self._batch_failed(conn, sock, batch, exc)
            return
        if batch.command == P.NBD_CMD_READ:
            sock.sendall(batch.pack_read_replies(conn))
        else:
            for req in requests:
                conn.reply_to(P.NBD_CMD_WRITE, req.handle)
            sock.sendall(conn.data_to_send())
        self.counters["requests"] += len(requests)
        batch.clear()

    def _batch_failed(self, conn, sock, batch: _Batch, exc: Exception) -> None:
        log.debug("nbd batch of %d failed (%s); serving its requests one by one", batch.count, exc)
        requests = list(batch.requests)
        batch.clear()
        for req in requests:
            batch.reply = self._handle(conn, sock, req, batch.reply)

    def _handle(self, conn: P.ServerConnection, sock: socket.socket, req: P.Request, reply: bytearray) -> bytearray:
        self.counters["requests"] += 1
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
        self.counters["errors"] += 1
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
        for sock, _ in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in clients:
            thread.join(timeout)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
