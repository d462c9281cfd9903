"""The benchmarks' latency floor: a 32-byte request answered with up to a sealed page (4 KiB and
a 16-byte tag) over loopback TCP, by ``recv_into`` + ``sendall`` in Python, nothing else in the way.

    python -m rram.testing.rawsocket [CPU,CPU... [SPIN_US]]   # prints its port, serves one client

``start`` runs that server in a child process (pinned to ``cpus``); ``RoundTrip`` is the
client side, one call per request/response.  The request names the reply's length, so a
baseline can move exactly the bytes rram moves (a compressed page is about half of 4 KiB).

Both ends wait in one of two ways, because rram's requester and provider do the second and a
fair baseline must wait as they do:
* sleeping (``spin_us=0``): a blocking ``recv_into``, woken by the kernel;
* spinning (``spin_us>0``): non-blocking ``recv_into`` in a loop for up to ``spin_us``, then a
  blocking one, as rram's tcp transport polls (the requester for its completion:
  ``rram.transport.tcp.DEFAULT_SPIN_US``; the provider for the next request:
  ``DEFAULT_PROVIDER_SPIN_US``).  rram's polls are adaptive (they stop while they miss); where
  they pay, as between two CPUs here, they poll on every wait, as these do.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

REQUEST = 32
PAGE = 4096  # the default reply: a whole page
#: the longest reply: the largest image rram stores remotely, a raw page sealed with its 16-byte
#: GCM tag (rram.datapath.seal.TAG), so a baseline moves what a sealed store moves
REPLY = PAGE + 16
_LENGTH = struct.Struct("<I")  # first 4 bytes of a request: reply length (0 means PAGE)


def serve(cpus: set[int] | None = None, spin_us: float = 0) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req, reply = bytearray(REQUEST), memoryview(os.urandom(REPLY))
    view = memoryview(req)
    spin_ns = int(spin_us * 1000)
    while True:
        got = _poll_into(conn, view, REQUEST, spin_ns) if spin_ns else 0
        while got < REQUEST:
            n = conn.recv_into(view[got:])
            if n == 0:
                return
            got += n
        length = _LENGTH.unpack_from(req)[0] or PAGE
        conn.sendall(reply[:min(length, REPLY)])


def _poll_into(sock: socket.socket, view: memoryview, length: int, spin_ns: int) -> int:
    """Non-blocking receives into ``view`` until ``length`` bytes are in or ``spin_ns`` has
    passed; the bytes received (0 at EOF, which the blocking recv after it sees again)."""
    got, deadline = 0, time.perf_counter_ns() + spin_ns
    while got < length and time.perf_counter_ns() < deadline:
        try:
            n = sock.recv_into(view[got:length], 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        if n == 0:
            break
        got += n
    return got


def start(cpus: set[int] | None = None, spin_us: float = 0) -> tuple[subprocess.Popen, int]:
    """The server in a child process, waiting for requests as ``spin_us`` says; returns
    (process, port).  Stop it with ``stop``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "rram.testing.rawsocket", ",".join(map(str, sorted(cpus or []))),
                             str(spin_us)], stdout=subprocess.PIPE, text=True, cwd=root)
    return proc, int(proc.stdout.readline())


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


class RoundTrip:
    """Client: ``rt(length)`` sends one request and reads the whole ``length``-byte reply."""

    def __init__(self, port: int, spin_us: float = 0):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.spin_ns = int(spin_us * 1000)
        self._req = bytearray(REQUEST)
        self._view = memoryview(bytearray(REPLY))

    def __call__(self, length: int = PAGE) -> None:
        if not 0 < length <= REPLY:
            raise ValueError(f"reply length must be 1..{REPLY}, got {length}")
        _LENGTH.pack_into(self._req, 0, length)
        self.sock.sendall(self._req)
        got = _poll_into(self.sock, self._view, length, self.spin_ns) if self.spin_ns else 0
        while got < length:
            n = self.sock.recv_into(self._view[got:length])
            if n == 0:
                raise ConnectionError("raw-socket server closed the connection")
            got += n

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    serve({int(c) for c in sys.argv[1].split(",")} if len(sys.argv) > 1 and sys.argv[1] else None,
          float(sys.argv[2]) if len(sys.argv) > 2 else 0)
