"""Fuzz a live NBD server (rram/frontends/nbd/server.py) whose export is a page store, so that
plain READs and WRITEs go through the C loop (ext/_nbdserve.pyx serve_loop, ext/_nbdwire.pyx)
and the rest through the sans-IO parser: mutations of the nbd corpus, each on its own connection.
Oracle: no connection thread dies of an exception (pytest turns it into an error), nothing is
logged at ERROR, and a well-behaved client still negotiates, writes and reads back its data.
tests/integration/test_nbd_fuzz.py does the same with hypothesis-built streams over a memory export.

RRAM_FUZZ_LIVE_RUNS sets the number of inputs (default 100).
"""
from __future__ import annotations

import logging
import os
import random
import socket

import pytest

from rram.frontends.nbd.server import NBDServer
from rram.testing.inproc import export_backend
from tests.fuzz import driver
from tests.integration.test_nbd_fuzz import GoodClient, wait_idle

pytest.importorskip("rram._ext._nbdserve", reason="built without liblz4: no C request path")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

RUNS = int(os.environ.get("RRAM_FUZZ_LIVE_RUNS", "100"))
SIZE = 1 << 20


def test_live_nbd_server_with_c_path_survives_mutated_streams(tmp_path, caplog):
    seeds = driver.corpus("nbd")
    rng = random.Random(4)
    path = str(tmp_path / "nbd.sock")
    with export_backend("pagestore", SIZE) as backend, \
            NBDServer(backend, export_name="rram", handshake_timeout=1.0, c_requests=True) as srv:
        srv.listen_unix(path)
        srv.start()
        for i in range(RUNS):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(path)
                try:
                    s.sendall(driver.mutate(rng, rng.choice(seeds), seeds))
                    s.shutdown(socket.SHUT_WR)
                    while s.recv(1 << 16):  # the server answers what it can, then closes
                        pass
                except (BrokenPipeError, ConnectionResetError):
                    pass
            if i % 20 == 19 or i == RUNS - 1:
                wait_idle(srv)
                good = GoodClient(path)
                data = rng.randbytes(8192)
                assert good.write_read(4096 * rng.randrange(SIZE // 4096 - 2), data) == data
                good.close()
        wait_idle(srv)
        assert srv.counters.get("c_requests", 0) > 0, srv.counters  # the C loop did serve
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()
