"""The benchmarks' latency floor: a 32-byte request answered with 4 KiB over loopback TCP,
by ``recv_into`` + ``sendall`` in Python, with nothing else in the way.

    python -m rram.testing.rawsocket [CPU,CPU...]     # prints its port, serves one client

``start`` runs that server in a child process (pinned to ``cpus``); ``RoundTrip`` is the
client side, one call per request/response.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

REQUEST = 32
REPLY = 4096


def serve(cpus: set[int] | None = None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req, reply = bytearray(REQUEST), os.urandom(REPLY)
    view = memoryview(req)
    while True:
        got = 0
        while got < REQUEST:
            n = conn.recv_into(view[got:])
            if n == 0:
                return
            got += n
        conn.sendall(reply)


def start(cpus: set[int] | None = None) -> tuple[subprocess.Popen, int]:
    """The server in a child process; returns (process, port).  Stop it with ``stop``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "rram.testing.rawsocket", ",".join(map(str, sorted(cpus or [])))],
                            stdout=subprocess.PIPE, text=True, cwd=root)
    return proc, int(proc.stdout.readline())


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


class RoundTrip:
    """Client: ``rt()`` sends one request and reads the whole reply."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._req = bytes(REQUEST)
        self._view = memoryview(bytearray(REPLY))

    def __call__(self) -> None:
        self.sock.sendall(self._req)
        got = 0
        while got < REPLY:
            got += self.sock.recv_into(self._view[got:])

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    serve({int(c) for c in sys.argv[1].split(",")} if len(sys.argv) > 1 and sys.argv[1] else None)
