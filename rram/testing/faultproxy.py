"""Network faults between a requester and one provider, on loopback (tests only).

The host kernel has no netem, so the tests put a small TCP forwarder between a requester and
a provider's control *and* data ports and switch faults on and off while real processes run:

    with ProviderProxy(cluster.config, "p1") as px:
        store = open_store(px.config, ...)   # the cluster file with p1's address -> the proxy
        px.set(delay=0.05)                   # 50 ms one-way latency on every byte
        px.set(loss=0.2)                     # 20 % of segments stall for a retransmission timeout
        px.set(bandwidth=1 << 20)            # 1 MiB/s each way
        px.blackhole(1.0)                    # nothing passes for 1 s, then the held bytes flow on
        px.reset()                           # RST on every connection now
        px.half_open()                       # provider side closed, requester side silent forever
        px.heal()                            # no faults
        px.tamper("flip-status")             # alter the next data COMPLETION (frametamper.py)

Why these shapes: a TCP stream cannot lose a byte, so packet loss shows up as a stall of one
retransmission timeout (``loss_stall``, Linux's minimum RTO by default) with head-of-line
blocking; a blackhole (a dead switch port, a partition) holds the bytes and delivers them when
it heals, as TCP's retransmissions would; a half-open connection is a peer that vanished
without a FIN or RST: the requester's socket stays established and nothing ever answers.

The data port a provider hands out in its ``connect`` reply is the provider's own; the control
forwarder rewrites those ``params`` (host, port) to a data forwarder it opens on demand, so
one ``ProviderProxy`` covers both paths with the same faults.  Loopback only, and on a
plaintext cluster (``LocalCluster(tls=False)``): that rewrite is exactly what TLS prevents.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import logging
import random
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass

from .frametamper import CompletionTamper, TamperPlan

log = logging.getLogger(__name__)

#: Linux's minimum retransmission timeout: what one lost segment costs a TCP stream
LOSS_STALL = 0.2
_CHUNK = 1 << 16
_LENGTH = struct.Struct(">I")


def _loopback(host: str) -> str:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"the fault proxy only forwards on loopback, not to {host}")
    return host


@dataclass
class Faults:
    """What every connection of a proxy suffers right now (read by the pump threads)."""

    delay: float = 0.0  # seconds added to every segment, each way
    loss: float = 0.0  # probability that a segment stalls for loss_stall
    loss_stall: float = LOSS_STALL
    bandwidth: float | None = None  # bytes/s each way per connection; None: unlimited
    blackhole_until: float = 0.0  # monotonic time until which nothing passes
    half_open: bool = False  # new and existing connections: nothing passes, ever


class _Pipe:
    """One direction of one connection: a reader stamps segments, a writer sends them when due."""

    def __init__(self, proxy: FaultProxy, src: socket.socket, dst: socket.socket, name: str, rewrite=None):
        self.proxy, self.src, self.dst, self.name = proxy, src, dst, name
        self.rewrite = rewrite  # bytes -> bytes on the stream (control reply rewriting), or None
        self.queue: deque[tuple[float, bytes]] = deque()
        self.cond = threading.Condition()
        self.eof = False
        self.sent_at = 0.0  # bandwidth pacing: when the last byte may have left

    def start(self) -> None:
        for target, role in ((self._read, "r"), (self._write, "w")):
            threading.Thread(target=target, name=f"faultproxy-{self.name}-{role}", daemon=True).start()

    def _read(self) -> None:
        rng = self.proxy.rng
        try:
            while True:
                data = self.src.recv(_CHUNK)
                if not data:
                    break
                if self.rewrite is not None:
                    data = self.rewrite(data)
                    if not data:
                        continue
                f = self.proxy.faults
                due = time.monotonic() + f.delay
                if f.loss and rng.random() < f.loss:
                    due += f.loss_stall
                with self.cond:
                    self.queue.append((due, data))
                    self.cond.notify()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait(0.05)
                    if not self.queue:
                        break
                    due, data = self.queue[0]
                if not self._wait_until_passable(due):
                    return
                with self.cond:
                    self.queue.popleft()
                bw = self.proxy.faults.bandwidth
                if bw:
                    self.sent_at = max(self.sent_at, time.monotonic()) + len(data) / bw
                    time.sleep(max(0.0, self.sent_at - time.monotonic()))
                self.dst.sendall(data)
            if not self.proxy.faults.half_open:  # a peer that vanished sends no FIN
                self.dst.shutdown(socket.SHUT_WR)  # pass the FIN on
        except OSError:
            pass

    def _wait_until_passable(self, due: float) -> bool:
        """Sleep until the segment is due and no blackhole holds it; False when the proxy closes."""
        while not self.proxy.closed:
            f = self.proxy.faults
            now = time.monotonic()
            hold = max(due, f.blackhole_until) - now
            if f.half_open:
                hold = 0.05
            if hold <= 0:
                return True
            time.sleep(min(hold, 0.05))
        return False


class FaultProxy:
    """A TCP forwarder from a loopback listener to ``target``, with switchable faults."""

    def __init__(self, target: tuple[str, int], *, listen_host: str = "127.0.0.1", faults: Faults | None = None,
                 rewrite_factory=None, seed: int | None = None):
        self.target = (_loopback(target[0]), int(target[1]))
        self.faults = faults if faults is not None else Faults()
        self.rng = random.Random(seed)
        self._rewrite_factory = rewrite_factory  # () -> (bytes -> bytes) per connection, upstream -> client
        self._listener = socket.create_server((_loopback(listen_host), 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.closed = False
        self.accepted = 0
        threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.address[1]}", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                down, _peer = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._open, args=(down,), daemon=True).start()

    def _open(self, down: socket.socket) -> None:
        # a blackhole or a vanished peer also holds new connections: the client's handshake hangs
        while not self.closed and (self.faults.half_open or time.monotonic() < self.faults.blackhole_until):
            time.sleep(0.05)
        try:
            up = socket.create_connection(self.target, timeout=5)
        except OSError as exc:
            log.debug("fault proxy: %s:%d unreachable: %s", *self.target, exc)
            _abort(down)
            return
        up.settimeout(None)
        for s in (up, down):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self.closed:
                _abort(up), _abort(down)
                return
            self._conns.append((down, up))
        rewrite = self._rewrite_factory() if self._rewrite_factory else None
        _Pipe(self, down, up, f"{self.address[1]}-up").start()
        _Pipe(self, up, down, f"{self.address[1]}-down", rewrite).start()

    def reset(self) -> int:
        """RST every current connection (both sides); returns how many."""
        with self._lock:
            conns, self._conns = self._conns, []
        for down, up in conns:
            _abort(down)
            _abort(up)
        return len(conns)

    def half_open(self) -> None:
        """Close the provider side of every connection; the requester side stays up and silent."""
        self.faults.half_open = True
        with self._lock:
            conns = list(self._conns)
        for _down, up in conns:
            _abort(up)

    def close(self) -> None:
        self.closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        self.reset()


def _abort(sock: socket.socket) -> None:
    """Close with an RST (linger 0), not a FIN: what a crashed or rebooted peer's kernel sends."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _ParamsRewriter:
    """Rewrites ``params: {host, port}`` in control frames from the provider to the data proxy.

    Control frames are a 4-byte big-endian length and JSON (rram/control/messages.py); the
    stream is re-framed whole frames at a time, so a frame split across segments waits for
    its rest.
    """

    def __init__(self, owner: ProviderProxy):
        self.owner = owner
        self.buf = bytearray()

    def __call__(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while len(self.buf) >= _LENGTH.size:
            (n,) = _LENGTH.unpack_from(self.buf)
            if len(self.buf) < _LENGTH.size + n:
                break
            body = bytes(self.buf[_LENGTH.size : _LENGTH.size + n])
            del self.buf[: _LENGTH.size + n]
            out += self._frame(body)
        return bytes(out)

    def _frame(self, body: bytes) -> bytes:
        try:
            msg = json.loads(body)
        except ValueError:
            return _LENGTH.pack(len(body)) + body  # not ours to judge: the requester will
        params = msg.get("params") if isinstance(msg, dict) else None
        if isinstance(params, dict) and "host" in params and "port" in params:
            host, port = self.owner.data_address((params["host"], params["port"]))
            msg["params"] = {**params, "host": host, "port": port}
            body = json.dumps(msg, separators=(",", ":")).encode()
        return _LENGTH.pack(len(body)) + body


class ProviderProxy:
    """Faults on every connection between requesters and one provider: control and data."""

    def __init__(self, cfg, name: str, *, seed: int | None = None):
        if cfg.tls_dir is not None:
            raise ValueError("the fault proxy rewrites control frames, which TLS hides: give it a cluster "
                             "without tls_dir (LocalCluster(tls=False))")
        self.name = name
        self.faults = Faults()
        node = cfg.node(name)
        self.control = FaultProxy((node.address, node.port), faults=self.faults, seed=seed,
                                  rewrite_factory=lambda: _ParamsRewriter(self))
        self.data: dict[tuple[str, int], FaultProxy] = {}
        self.tampering = TamperPlan()  # shared by every data connection's provider -> requester pipe
        self._lock = threading.Lock()
        #: ``cfg`` with this provider's control address pointing at the proxy (for open_store)
        self.config = copy.deepcopy(cfg)
        routed = self.config.node(name)
        routed.address, routed.port = self.control.address

    def data_address(self, target: tuple[str, int]) -> tuple[str, int]:
        with self._lock:
            proxy = self.data.get(target)
            if proxy is None:
                proxy = self.data[target] = FaultProxy(target, faults=self.faults,
                                                       rewrite_factory=lambda: CompletionTamper(self.tampering))
            return proxy.address

    def _all(self) -> list[FaultProxy]:
        with self._lock:
            return [self.control, *self.data.values()]

    def set(self, **faults) -> None:
        """Change delay, loss, loss_stall or bandwidth (see Faults); others stay as they are."""
        for key, value in faults.items():
            if key not in ("delay", "loss", "loss_stall", "bandwidth"):
                raise TypeError(f"unknown fault {key!r}")
            setattr(self.faults, key, value)

    def tamper(self, mode: str) -> None:
        """Alter the next COMPLETION on any data connection, once (modes: frametamper.MODES);
        ``tampering.done`` lists what was applied."""
        self.tampering.arm(mode)

    def blackhole(self, seconds: float) -> None:
        """Nothing passes either way for ``seconds`` (held bytes flow on afterwards)."""
        self.faults.blackhole_until = time.monotonic() + seconds

    def reset(self) -> int:
        return sum(p.reset() for p in self._all())

    def half_open(self) -> None:
        for p in self._all():
            p.half_open()

    def heal(self) -> None:
        """No faults from now on (connections left half-open stay dead: reset them too)."""
        f = self.faults
        if f.half_open:
            f.half_open = False
            self.reset()
        f.delay = f.loss = 0.0
        f.bandwidth = None
        f.blackhole_until = 0.0

    def close(self) -> None:
        for p in self._all():
            p.close()

    def __enter__(self) -> ProviderProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
