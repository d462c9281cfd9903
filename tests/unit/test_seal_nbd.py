"""A sealed page that no copy opens reaches an NBD client as EIO, never as wrong bytes or zeros.

An in-process provider (its slabs are in this process's memory, so the test alters them with a
plain memmove) behind a real NBDServer over a Unix socket; the client is the raw one of
test_nbd_batching.  The C request path declines remote pages, so the read goes through the store.
"""
from __future__ import annotations

import ctypes
import os


from rram.datapath import keys as K
from rram.datapath import slab as L
from rram.frontends.nbd import protocol as P
from rram.frontends.nbd.backend import PageStoreBackend
from rram.frontends.nbd.server import NBDServer
from rram.testing import inproc
from rram.testing.inproc import InProcessProvider

from .test_nbd_batching import Client

PAGE = 4096
PAGES = 128
SIZE = PAGES * PAGE


def test_a_page_altered_on_its_only_copy_is_eio_and_the_export_goes_on(tmp_path):
    provider = InProcessProvider("p0", 8 << 20)
    store = inproc.make_store([provider], local_budget=64 << 10, slab_size=1 << 20)
    pool = store.create_pool(persistent=True)
    data = os.urandom(SIZE)
    try:
        with NBDServer(PageStoreBackend(store, pool, obj=1, size=SIZE), export_name="") as srv:
            path = str(tmp_path / "nbd.sock")
            srv.listen_unix(path)
            srv.start()
            client = Client(path, structured=False)
            sender = client.send(b"".join(client.request(P.NBD_CMD_WRITE, i + 1, i * PAGE, PAGE,
                                                         data[i * PAGE:(i + 1) * PAGE]) for i in range(PAGES)))
            assert all(client.reply({})[1] == 0 for _ in range(PAGES))
            sender.join()
            remote = [i for i in range(PAGES) if L.is_remote(store.map.get(K.pack(pool, 1, i)))]
            assert len(remote) > PAGES // 2 and store.seal is not None
            victim, other = remote[0], remote[1]
            loc = store.map.get(K.pack(pool, 1, victim))
            addr = int(store.remote.rep_addr[0, L.loc_slab(loc)]) + L.loc_offset(loc) + 7
            byte = ctypes.c_uint8.from_address(addr)
            byte.value ^= 0x01  # what a provider (or whoever writes its memory) could do
            for handle, block in ((900, victim), (901, other)):
                client.send(client.request(P.NBD_CMD_READ, handle, block * PAGE, PAGE)).join()
                got_handle, error, payload = client.reply({handle: PAGE})
                assert got_handle == handle
                if block == victim:
                    assert error == P.NBD_EIO and payload == b""
                else:
                    assert error == 0 and payload == data[block * PAGE:(block + 1) * PAGE]
            assert store.stats()["seal_failures"] == 1
            client.close()
    finally:
        store.close()
        provider.close()
