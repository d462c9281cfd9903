"""FarMemory over RDMA verbs in the soft-RoCE guest (Debian's 6.1 kernel): its own userfaultfd
feature set (no UFFDIO_CONTINUE_MODE_WP there), provider processes on rxe0, the handler's
store on rxe1.  Threads holding the GIL, a read() into the region, and a provider SIGKILLed in
the middle of a scan (r=2): every byte reads back."""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np
import pytest

from rram import PAGE_SIZE
from rram import config as C
from rram.frontends.farmem import FarMemory, kernel_support
from rram.testing.cluster import LocalCluster, free_port

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SIZE = 4 << 20
BUDGET = 1 << 20


@pytest.fixture(scope="module")
def config_path(rdma_devices):
    kernel_support()  # in the guest a missing feature is a failure, not a skip
    with LocalCluster(n_providers=2, capacity="64MiB", transport="verbs", slab_size="4MiB", replicas=2,
                      heartbeat_interval=1.0, suspect_threshold=20.0, dead_threshold=60.0,
                      requester={"repatriate_rate": 0}) as c:
        cfg = C.load(c.config_path)
        cfg.nodes.append(C.NodeConfig(name="req", address="127.0.0.1", port=free_port(), roles=["requester"],
                                      rdma_device=rdma_devices[-1], gid_index=0))
        path = os.path.join(c.workdir, "farmem.yaml")
        with open(path, "w") as f:
            f.write(C.dump(cfg))
        yield c, path


def test_farmem_over_verbs(config_path, tmp_path):
    cluster, path = config_path
    data = np.random.default_rng(11).integers(0, 1 << 62, SIZE // 8, dtype=np.uint64)
    src = tmp_path / "in.bin"
    src.write_bytes(data.tobytes())
    with FarMemory(path, size=SIZE, budget=BUDGET, name="vm", local_budget=256 << 10) as mem:
        assert mem.kernel_faults, mem.uffd_from
        with open(src, "rb", buffering=0) as f:      # kernel-mode faults
            assert f.readinto(mem) == SIZE
        a = mem.array(np.uint64, SIZE // 8)
        assert hashlib.sha256(memoryview(a)).digest() == hashlib.sha256(data).digest()
        failures = []

        def worker(k: int):
            try:
                q = len(a) // 4
                sl, ref = a[k * q:(k + 1) * q], data[k * q:(k + 1) * q]
                sl += np.uint64(k + 1)
                ref += np.uint64(k + 1)
                assert sl.sum() == ref.sum()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        half = len(a) // 2
        assert np.array_equal(a[:half], data[:half])
        cluster.kill("p0")                            # r=2: the other copy serves the rest
        assert np.array_equal(a[half:], data[half:])
        assert hashlib.sha256(memoryview(a)).digest() == hashlib.sha256(data).digest()
        s = mem.stats()
        assert s["resident_pages"] <= BUDGET // PAGE_SIZE and s["written_back"] > 0
        del a
