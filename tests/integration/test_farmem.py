"""FarMemory against real provider processes: numpy workloads from threads holding the
GIL, kernel-mode faults (readinto), eviction under a budget 4x smaller than the region,
provider and handler deaths."""
from __future__ import annotations

import faulthandler
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from rram import PAGE_SIZE, errors
from rram.frontends.farmem import FarMemory, kernel_support

from .conftest import tcp_cluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SIZE = 8 << 20
BUDGET = 2 << 20  # the region is 4x its resident budget
STORE = {"local_budget": 1 << 20}  # and most pages leave the handler's local pool for the providers


@pytest.fixture(autouse=True)
def no_silent_hang():
    """A thread blocked on a page while holding the GIL stops pytest-timeout too (it needs the
    GIL): faulthandler's C thread dumps every stack and ends the run instead."""
    faulthandler.dump_traceback_later(170, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _support_or_skip():
    try:
        kernel_support()
    except (errors.RramError, OSError) as exc:
        pytest.skip(f"userfaultfd unusable here: {exc}")


@pytest.fixture
def cluster(tmp_path):
    _support_or_skip()
    with tcp_cluster(n_providers=2, capacity="64MiB", workdir=str(tmp_path), slab_size="1MiB") as c:
        yield c


def region(cluster, size=SIZE, budget=BUDGET, **kw):
    return FarMemory(cluster.config_path, size=size, budget=budget, **{**STORE, **kw})


def digest(buf) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()


def test_untouched_pages_read_as_zeros_and_writes_read_back(cluster):
    with region(cluster) as mem:
        a = mem.array(np.uint8, SIZE)
        assert not a[::PAGE_SIZE].any() and not a.any()
        rng = np.random.default_rng(1)
        local = rng.integers(0, 256, SIZE, dtype=np.uint8)
        local[: SIZE // 4] = 0          # some pages stay zero, some compress, some do not
        local[SIZE // 4: SIZE // 2] = np.tile(np.arange(256, dtype=np.uint8), SIZE // 4 // 256)
        a[:] = local
        assert digest(a) == digest(local)
        s = mem.stats()
        assert s["resident_pages"] <= BUDGET // PAGE_SIZE
        assert s["evicted_dirty"] > 0 and s["written_back"] > 0
        del a


def test_first_writes_to_a_new_region_take_no_write_protect_fault(cluster):
    """Pages the store never held are mapped writable at once: filling a new region takes no
    WP fault.  Once stored they come back write-protected, so a later write is still seen
    (a WP fault) and kept, zero pages included; a walk of writes un-protects ahead of itself."""
    with region(cluster) as mem:
        a = mem.array(np.uint8, SIZE)
        local = np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8)
        local[: SIZE // 8] = 0
        a[:] = local
        s = mem.stats()
        assert s["wp_faults"] == 0 and s["evicted_dirty"] > 0, s
        before = mem.stats()
        a[::PAGE_SIZE] += 1  # each page read, then written, walking up the region
        local[::PAGE_SIZE] += 1
        s = mem.stats()
        wp, ahead = s["wp_faults"] - before["wp_faults"], s["write_ahead"] - before["write_ahead"]
        # writes are seen; along the walk the pages ahead are un-protected in runs
        assert 0 < wp < SIZE // PAGE_SIZE // 4 and ahead > SIZE // PAGE_SIZE // 2, s
        assert digest(a) == digest(local)
        a[SIZE // 2::PAGE_SIZE * 7] = 9  # scattered writes to stored pages: one WP fault each
        local[SIZE // 2::PAGE_SIZE * 7] = 9
        assert digest(a) == digest(local)
        del a


def test_numpy_threads_holding_the_gil(cluster):
    """Four threads run numpy on their quarter of a region 4x its budget (sums, in-place
    updates, random gathers, np.sort of a slice) while a pure-Python thread keeps counting."""
    with region(cluster) as mem:
        a = mem.array(np.int64, SIZE // 8)
        local = np.random.default_rng(2).integers(-(1 << 40), 1 << 40, len(a))
        a[:] = local
        stop, ticks, failures = threading.Event(), [0], []

        def python_thread():
            while not stop.is_set():
                ticks[0] += sum(range(100))

        def worker(k: int):
            try:
                q = len(a) // 4
                sl, ref = a[k * q:(k + 1) * q], local[k * q:(k + 1) * q]
                rng = np.random.default_rng(10 + k)
                for _ in range(3):
                    assert sl.sum() == ref.sum()
                    sl += 3
                    ref += 3
                    idx = rng.integers(0, q, 2000)
                    assert np.array_equal(sl[idx], ref[idx])
                    part = slice(q // 3, q // 3 + q // 8)
                    sl[part] = np.sort(sl[part])
                    ref[part] = np.sort(ref[part])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        py = threading.Thread(target=python_thread)
        py.start()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        py.join()
        assert not failures, failures
        assert ticks[0] > 0
        assert digest(a) == digest(local)
        assert mem.stats()["resident_pages"] <= BUDGET // PAGE_SIZE
        del a, local


def test_file_read_into_the_region_and_written_out(cluster, tmp_path):
    """Kernel-mode faults: read() and write() system calls take the region's pages."""
    data = np.random.default_rng(3).integers(0, 256, SIZE, dtype=np.uint8).tobytes()
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    with region(cluster) as mem:
        assert mem.kernel_faults
        with open(src, "rb", buffering=0) as f:
            assert f.readinto(mem) == SIZE
        with open(out, "wb", buffering=0) as f:
            view = memoryview(mem)
            assert f.write(view) == SIZE
            view.release()
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_many_repetitions_without_a_hang(cluster):
    with region(cluster, size=2 << 20, budget=512 << 10) as mem:
        a = mem.array(np.uint32, (2 << 20) // 4)
        local = np.zeros(len(a), dtype=np.uint32)
        rng = np.random.default_rng(4)
        for rep in range(100):
            idx = rng.integers(0, len(a), 64)
            a[idx] += rep + 1  # a repeated index adds once, in both arrays
            local[idx] += rep + 1
            if rep % 10 == 9:
                assert np.array_equal(a, local)
        del a


def test_several_regions_in_one_process(cluster):
    with region(cluster, size=2 << 20, budget=512 << 10) as m1, region(cluster, size=2 << 20, budget=512 << 10) as m2:
        a, b = m1.array(np.uint16, (1 << 20,)), m2.array(np.uint16, (1 << 20,))
        a[:] = 7
        b[:] = np.arange(1 << 20, dtype=np.uint16)
        assert int(a.sum()) == 7 << 20
        assert np.array_equal(b, np.arange(1 << 20, dtype=np.uint16))
        del a, b


def test_prefetch_counters_on_a_sequential_scan(cluster):
    with region(cluster) as mem:
        if not mem.prefetch_ok:
            pytest.skip("kernel lacks UFFD_FEATURE_MINOR_SHMEM: no prefetch")
        a = mem.array(np.uint64, SIZE // 8)
        a[:] = 1
        before = mem.stats()
        assert int(a.sum()) == len(a)
        s = mem.stats()
        scanned = s["faults"] - before["faults"]
        assert s["prefetched"] > before["prefetched"] and s["prefetch_hits"] > before["prefetch_hits"]
        assert s["missing_faults"] - before["missing_faults"] < scanned // 4  # most touches were hits
        mem.advise("random")
        mem.advise("sequential")
        assert mem.prefetch(0, 64 * PAGE_SIZE) >= 0
        del a


def test_random_faults_served_in_c_then_a_scan_is_prefetched(cluster):
    """Random reads of evicted pages are served by the handler's C loop (no Python a fault),
    from the local pool and from the providers, byte for byte and under the budget; a scan
    that follows makes a trend the C loop hands back to the predictor, which prefetches it."""
    data = np.random.default_rng(5).integers(0, 256, SIZE, dtype=np.uint8)
    data[: SIZE // 2].reshape(-1, PAGE_SIZE)[:, 64:] = 0  # half the pages compress well
    with region(cluster) as mem:
        a = mem.array(np.uint8, SIZE)
        mem.advise("random")
        a[:] = data
        mem.advise("normal")
        before = mem.stats()
        npages = SIZE // PAGE_SIZE
        for p in np.random.default_rng(6).permutation(npages)[: npages // 2].tolist():
            assert a[p * PAGE_SIZE + 100] == data[p * PAGE_SIZE + 100]
        s = mem.stats()
        c_faults = s["c_faults"] - before["c_faults"]
        # nearly all: C returns before room runs out and after an eviction begins (wait_faults)
        assert c_faults > 0.9 * (s["missing_faults"] - before["missing_faults"]), s
        assert s["resident_pages"] <= BUDGET // PAGE_SIZE
        assert s["written_back"] > 0 and s["prefetched"] == before["prefetched"]  # random: nothing prefetched
        if mem.prefetch_ok:
            assert digest(a) == digest(data)  # a scan: the trend leaves the C loop
            t = mem.stats()
            assert t["prefetch_hits"] > s["prefetch_hits"] and t["c_faults"] - s["c_faults"] < npages // 4, t
        assert digest(a) == digest(data)
        del a


def test_bad_input_gets_a_clear_error_and_the_region_keeps_serving(cluster):
    with pytest.raises(errors.ConfigError, match="size"):
        FarMemory(cluster.config_path, size=0, budget=BUDGET)
    with pytest.raises(errors.ConfigError, match="budget"):
        FarMemory(cluster.config_path, size=SIZE, budget=PAGE_SIZE)
    with pytest.raises(errors.RramError, match="colour"):
        FarMemory(cluster.config_path, size=SIZE, budget=BUDGET, colour="blue")
    with pytest.raises(errors.RramError, match="handler could not start: ConfigError: .*nope.yaml"):
        FarMemory(os.path.join(os.path.dirname(cluster.config_path), "nope.yaml"), size=SIZE, budget=BUDGET)
    with region(cluster, size=1 << 20, budget=512 << 10) as mem:
        with pytest.raises(ValueError, match="does not fit"):
            mem.array(np.float64, (1 << 20,))
        with pytest.raises(errors.RramError, match="advise"):
            mem.advise("sideways")
        with pytest.raises(errors.RramError, match="resized"):
            mem.resize(2 << 20)
        if mem.prefetch_ok:  # a prefetch without a valid offset failed the whole region (KeyError)
            for bad in ({"op": "prefetch"}, {"op": "prefetch", "offset": "0", "length": 4096}):
                with pytest.raises(errors.RramError, match="prefetch offset must be an integer"):
                    mem._request(bad)
        mem[0:4] = b"abcd"
        assert mem[0:4] == b"abcd"
    with pytest.raises(errors.RramError, match="closed"):
        mem.stats()


def test_scan_survives_a_provider_sigkill(tmp_path):
    """r=2: a provider dies in the middle of a scan; every page reads back from the other copy."""
    _support_or_skip()
    with tcp_cluster(n_providers=3, capacity="64MiB", workdir=str(tmp_path), slab_size="1MiB", replicas=2,
                     lease_grace=1.0, io_timeout=1.0) as cl:
        with region(cl) as mem:
            a = mem.array(np.uint64, SIZE // 8)
            local = np.random.default_rng(5).integers(0, 1 << 63, len(a), dtype=np.uint64)
            a[:] = local
            half = len(a) // 2
            assert np.array_equal(a[:half], local[:half])
            cl.kill("p0")
            assert np.array_equal(a[half:], local[half:])
            assert digest(a) == digest(local)
            del a


CHILD = textwrap.dedent("""
    import os, sys, time, numpy as np
    from rram.frontends.farmem import FarMemory
    mem = FarMemory(sys.argv[1], size={size}, budget={budget}, local_budget=1 << 20, name="victim")
    a = mem.array(np.uint8, {size})
    a[:] = np.random.default_rng(0).integers(0, 256, {size}, dtype=np.uint8)  # incompressible:
    # most pages are now evicted, and most of those went on to the providers
    print(mem.handler_pid, flush=True)
    sys.stdin.readline()                  # the parent stops or kills the handler
    print("touching", flush=True)
    t0 = time.monotonic()
    {touch}
    print("READ", int(a.sum()), time.monotonic() - t0, flush=True)
""")


def _child(cluster, touch: str) -> subprocess.Popen:
    code = CHILD.format(size=SIZE, budget=BUDGET, touch=touch)
    return subprocess.Popen([sys.executable, "-c", code, cluster.config_path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("blocked", [False, True], ids=["after", "while-blocked"])
def test_handler_killed_faulting_thread_gets_a_clear_error(cluster, blocked):
    """The handler is SIGKILLed (while a thread already waits on a missing page, or before
    the touch): the toucher dies of SIGSEGV within a second, naming the region and why."""
    child = _child(cluster, "s = int(a[:4096 * 16].sum())")
    try:
        handler = int(child.stdout.readline())
        if blocked:
            os.kill(handler, signal.SIGSTOP)       # the touch below then waits in the kernel
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "touching"
            time.sleep(0.3)
        os.kill(handler, signal.SIGKILL)
        t0 = time.monotonic()
        if not blocked:
            child.stdin.write("go\n")
            child.stdin.flush()
        out, err = child.communicate(timeout=10)
        elapsed = time.monotonic() - t0
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGSEGV, (child.returncode, out, err)
    assert "READ" not in out
    assert "rram FarMemory" in err and "'victim'" in err and "handler process exited" in err, err
    assert elapsed < 2.0


def test_fork_child_gets_a_clear_error(cluster):
    code = textwrap.dedent("""
        import os, sys, numpy as np
        from rram.frontends.farmem import FarMemory
        with FarMemory(sys.argv[1], size=1 << 20, budget=512 << 10, name="parent-only") as mem:
            mem[0:3] = b"abc"
            pid = os.fork()
            if pid == 0:
                print(bytes(mem[0:3]), flush=True)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            print("child", os.WIFSIGNALED(status) and os.WTERMSIG(status), flush=True)
            print("parent", bytes(mem[0:3]), flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code, cluster.config_path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"child {int(signal.SIGSEGV)}" in r.stdout and "parent b'abc'" in r.stdout
    assert "not inherited by a forked child" in r.stderr and "'parent-only'" in r.stderr


def test_store_failure_reaches_the_faulting_thread(tmp_path):
    """Every provider dies: the handler's read fails, and the thread that needed the page dies
    with the store's error instead of waiting forever or reading zeros."""
    _support_or_skip()
    with tcp_cluster(n_providers=2, capacity="64MiB", workdir=str(tmp_path), slab_size="1MiB",
                     lease_grace=1.0, io_timeout=1.0) as cl:
        child = _child(cl, "s = int(a[:4096 * 16].sum())")  # the first pages left for the providers first
        try:
            child.stdout.readline()
            for name in cl.providers:
                cl.kill(name)
            t0 = time.monotonic()
            child.stdin.write("go\n")
            child.stdin.flush()
            out, err = child.communicate(timeout=30)
            elapsed = time.monotonic() - t0
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGSEGV, (child.returncode, out, err)
    assert "READ" not in out
    assert "rram FarMemory" in err and "its handler failed" in err, err
    assert elapsed < 10.0


def test_handler_death_is_a_python_error_for_requests_and_close_still_works(cluster):
    mem = region(cluster, size=1 << 20, budget=512 << 10)
    try:
        mem[0:2] = b"ok"
        os.kill(mem.handler_pid, signal.SIGKILL)
        deadline = time.monotonic() + 1.0
        while not mem.failure and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "handler process exited" in mem.failure
        with pytest.raises(errors.RramError, match="handler process exited"):
            mem.stats()
    finally:
        mem.close()
    assert mem.closed


def test_drain_under_a_region_being_read_and_written(tmp_path):
    """`rram drain` empties the fullest provider while threads scan and update the region."""
    from rram.control.client import ProviderClient

    _support_or_skip()
    with tcp_cluster(n_providers=3, capacity="64MiB", workdir=str(tmp_path), slab_size="1MiB", replicas=2,
                     heartbeat_interval=0.2, suspect_threshold=0.5, dead_threshold=1.0, lease_grace=2.0) as cl:
        with region(cl, size=16 << 20, budget=4 << 20, local_budget=256 << 10) as mem:
            a = mem.array(np.uint64, (16 << 20) // 8)
            local = np.random.default_rng(6).integers(0, 1 << 63, len(a), dtype=np.uint64)
            a[:] = local
            used = {}
            for name in cl.providers:
                c = ProviderClient(cl.config.node(name), cl.credential("test-admin", "operator"), tls=cl.tls)
                c.connect()
                used[name] = c.stats()["used"]
                c.close()
            victim = max(used, key=used.get)
            assert used[victim] > 0
            drain = subprocess.Popen([sys.executable, "-m", "rram", "drain", "--config", cl.config_path, victim,
                                      "--timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            rounds = 0
            while drain.poll() is None or rounds < 2:
                a[rounds::7] += np.uint64(1)
                local[rounds::7] += np.uint64(1)
                assert np.array_equal(a, local)
                rounds += 1
            out, err = drain.communicate()
            assert drain.returncode == 0, err
            assert digest(a) == digest(local)
            del a


def test_handler_exits_when_the_region_process_is_killed(cluster):
    """No orphan: the handler sees its control socket close and exits, releasing its store."""
    child = _child(cluster, "pass")
    try:
        handler = int(child.stdout.readline())
        child.kill()
        child.wait(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _alive(handler):
            time.sleep(0.05)
        assert not _alive(handler), "the handler outlived its region's process"
    finally:
        child.kill()
        child.communicate()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("threads", [1, 3])
def test_random_operations_against_a_local_copy(cluster, threads):
    """Mixed reads, writes of any size and alignment, prefetch hints and advice switches on a
    region 8x its budget (64 pages), from 1 or 3 threads whose byte ranges share pages at
    their borders: every state change of a page, checked byte for byte."""
    size, budget = 2 << 20, 256 << 10
    local = np.zeros(size, dtype=np.uint8)
    failures = []
    with region(cluster, size=size, budget=budget) as mem:
        a = mem.array(np.uint8, size)

        def worker(k: int):
            rng = np.random.default_rng(k)
            lo, hi = k * size // threads + 1, (k + 1) * size // threads - 1  # not page aligned
            try:
                for op in range(1500 // threads):
                    kind = rng.integers(0, 10)
                    start = int(rng.integers(lo, hi))
                    length = int(min(hi - start, rng.choice([1, 7, PAGE_SIZE, 3 * PAGE_SIZE + 5, 40 * PAGE_SIZE])))
                    if kind < 4:
                        data = rng.integers(0, 256, length, dtype=np.uint8)
                        a[start:start + length] = data
                        local[start:start + length] = data
                    elif kind < 8:
                        assert np.array_equal(a[start:start + length], local[start:start + length]), (op, start)
                    elif kind == 8 and mem.prefetch_ok:
                        mem.prefetch(start, length)
                    else:
                        mem.advise(["normal", "sequential", "random"][int(rng.integers(0, 3))])
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert not failures, failures
        assert digest(a) == digest(local)
        s = mem.stats()
        assert s["resident_pages"] <= budget // PAGE_SIZE
        assert s["evicted_dirty"] and s["evicted_clean"]
        del a


def test_one_service_serves_regions_of_several_processes_under_one_budget(cluster, tmp_path):
    sock = str(tmp_path / "farmem.sock")
    svc = subprocess.Popen([sys.executable, "-m", "rram.frontends.farmem.service", "--config", cluster.config_path,
                            "--socket", sock, "--budget", "1MiB", "--local-budget", "256KiB"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    other = textwrap.dedent("""
        import sys, numpy as np
        from rram.frontends.farmem import FarMemory
        with FarMemory(None, size=2 << 20, budget=256 << 10, service=sys.argv[1], name="other") as mem:
            a = mem.array(np.uint32, (1 << 19,))
            a[:] = np.arange(1 << 19, dtype=np.uint32)
            print("ok" if np.array_equal(a, np.arange(1 << 19, dtype=np.uint32)) else "BAD", flush=True)
            del a
    """)
    try:
        assert "ready" in svc.stdout.readline()
        with FarMemory(None, size=2 << 20, budget=512 << 10, service=sock, name="mine") as mem:
            assert mem.handler_pid == svc.pid
            with pytest.raises(errors.RramError, match="does not fit"):
                FarMemory(None, size=1 << 20, budget=768 << 10, service=sock)
            a = mem.array(np.uint64, (2 << 20) // 8)
            a[:] = 5
            child = subprocess.run([sys.executable, "-c", other, sock], capture_output=True, text=True, timeout=120)
            assert child.stdout.strip() == "ok", child.stderr
            assert int(a.sum()) == 5 * len(a)
            assert mem.stats()["resident_pages"] <= (512 << 10) // PAGE_SIZE
            del a
        with FarMemory(None, size=1 << 20, budget=1 << 20, service=sock) as mem:  # the budget is free again
            mem[0:1] = b"x"
            assert mem[0:1] == b"x"
            svc.kill()                                   # the service dies: its regions fail loudly
            deadline = time.monotonic() + 1.0
            while not mem.failure and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "handler process exited" in mem.failure
    finally:
        svc.kill()
        svc.communicate()


def test_rram_requester_serves_far_memory_beside_its_nbd_export(cluster, tmp_path):
    """`rram requester --farmem-socket`: one store behind the NBD export and the regions."""
    sock, nbd = str(tmp_path / "farmem.sock"), str(tmp_path / "nbd.sock")
    req = subprocess.Popen([sys.executable, "-m", "rram", "requester", "--config", cluster.config_path,
                            "--name", "req", "--export-size", "16MiB", "--socket", nbd, "--no-mlock",
                            "--farmem-socket", sock, "--farmem-budget", "512KiB"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = req.stdout.readline()
        assert "ready" in ready and f"farmem={sock}" in ready, ready + req.stderr.read()
        with FarMemory(None, size=2 << 20, budget=512 << 10, service=sock) as mem:
            assert mem.handler_pid == req.pid
            a = mem.array(np.uint64, (2 << 20) // 8)
            a[:] = np.arange(len(a), dtype=np.uint64)
            assert np.array_equal(a, np.arange(len(a), dtype=np.uint64))  # 4x the budget: pages came back
            assert mem.stats()["resident_pages"] <= (512 << 10) // PAGE_SIZE
            del a
    finally:
        req.terminate()
        req.communicate(timeout=30)
