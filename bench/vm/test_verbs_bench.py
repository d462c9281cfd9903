"""rram over verbs against perftest on the same two devices, in one run (soft-RoCE VM).

    scripts/bench-vm.sh                      # boots the guest, runs this, prints the table

Requester side (this process, perftest clients) on vCPU 0, passive side (provider processes,
perftest servers) on vCPU 1; the requester uses the last device (rxe1), providers the first
(rxe0), so every operation crosses the veth pair.  Compared:
  * 4 KiB READ/WRITE latency: one op posted and polled through rram's endpoint, and a
    store.get of a remote (incompressible, so 4 KiB READ) page, vs ib_read_lat / ib_write_lat
    t_typical (ib_write_lat reports half a ping-pong round trip; our WRITE waits for the ACK);
  * throughput with batches of 256 4 KiB ops (4 batches in flight) and store.get_many of
    remote pages, vs ib_read_bw / ib_write_bw message rate at the same depth (``-t 1024``;
    READs ``-o 16``, rram's max_rd_atomic), so both keep as much in flight.
Results go to $RRAM_BENCH_OUT (default /tmp/rram-bench) as verbs-bench.json and .md.
"""
from __future__ import annotations

import itertools
import json
import os
import platform

import numpy as np
import pytest

from rram.testing.pages import PAGE_SIZE, make_pages
from rram.transport import OP_READ, OP_WRITE, new_completions, new_ops, verbs
from run_perftest import run_pair
from tests.conftest import require_or_skip

pytestmark = pytest.mark.vm

BATCH = 256
DEPTH = 4  # batches in flight
#: perftest runs at the depth rram's throughput rounds keep in flight (BATCH x DEPTH work
#: requests), and its READs with the outstanding-read limit rram's QPs use (max_rd_atomic)
RD_ATOMIC = 16
PERFTEST_DEPTH = {"ib_read_bw": ("-t", str(BATCH * DEPTH), "-o", str(RD_ATOMIC)),
                  "ib_write_bw": ("-t", str(BATCH * DEPTH))}
REGION_PAGES = 1024
LAT_ROUNDS = int(os.environ.get("RRAM_BENCH_LAT_ROUNDS", "2000"))
BW_PAGES = 4096  # pages a throughput round moves
PERFTEST_BW_ITERS = 5000
REQ_CPU, PEER_CPU = (0, 1) if (os.cpu_count() or 1) >= 2 else (0, 0)
OUT_DIR = os.environ.get("RRAM_BENCH_OUT", "/tmp/rram-bench")

RESULTS: dict = {"rows": [], "perftest": {}, "cpus": {}}


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def devices() -> tuple[str, str]:
    """(provider device, requester device): rxe0, rxe1 in the VM."""
    require_or_skip(verbs.unavailable_reason())
    from rram._ext import _verbs

    names = []
    for name in _verbs.device_names()[0]:
        with _verbs.Context(name) as ctx:
            if ctx.query_port(1)["active"]:
                names.append(name)
    os.sched_setaffinity(0, {REQ_CPU})
    RESULTS["cpus"]["bench process (rram requester)"] = sorted(os.sched_getaffinity(0))
    RESULTS["devices"] = {"provider": names[0], "requester": names[-1]}
    return names[0], names[-1]


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS["rows"]:
        return
    RESULTS["host"] = {"kernel": platform.release(), "cpus": os.cpu_count(),
                       "batch": BATCH, "depth": DEPTH, "lat_rounds": LAT_ROUNDS}
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "verbs-bench.json"), "w") as f:
        json.dump(RESULTS, f, indent=2)
    with open(os.path.join(OUT_DIR, "verbs-bench.md"), "w") as f:
        f.write(markdown(RESULTS))


@pytest.fixture(scope="module")
def perftest(devices):
    """perftest results by tool, each run once, on demand (server: provider device, vCPU 1)."""
    cache: dict = {}
    ports = itertools.count(18515)

    def get(tool: str) -> dict:
        if tool not in cache:
            iters = LAT_ROUNDS if tool.endswith("_lat") else PERFTEST_BW_ITERS
            cache[tool] = RESULTS["perftest"][tool] = run_pair(
                tool, devices[0], devices[1], iters=iters, port=next(ports),
                server_cpu=PEER_CPU, client_cpu=REQ_CPU, extra=PERFTEST_DEPTH.get(tool, ()))
        return cache[tool]

    return get


@pytest.fixture(scope="module")
def lease(devices):
    """An in-process provider session on the provider device and an endpoint to it."""
    pt = verbs.ProviderTransportImpl(device=devices[0])
    rt = verbs.RequesterTransportImpl(device=devices[1])
    session = pt.open_session("bench")
    remote = np.frombuffer(np.random.default_rng(1).bytes(REGION_PAGES * PAGE_SIZE), dtype=np.uint8).copy()
    rkey = session.register(remote.ctypes.data, remote.size)
    ep = rt.endpoint()
    ep.connect(session.accept(ep.local_params()))
    local = np.zeros(REGION_PAGES * PAGE_SIZE, dtype=np.uint8)
    lkey = ep.register_local(local.ctypes.data, local.size)

    def ops(pages: np.ndarray, opcode: int) -> np.ndarray:
        o = new_ops(len(pages))
        o["local_addr"] = local.ctypes.data + pages.astype(np.uint64) * PAGE_SIZE
        o["remote_addr"] = remote.ctypes.data + pages.astype(np.uint64) * PAGE_SIZE
        o["length"], o["lkey"], o["rkey"], o["opcode"] = PAGE_SIZE, lkey, rkey, opcode
        return o

    yield ep, ops
    ep.close()
    session.close()
    rt.close()
    pt.close()


@pytest.fixture(scope="module")
def remote_store(devices):
    """A store on one real provider process whose pages of object 1 are all remote."""
    import rram
    from rram import config as C
    from rram.testing.cluster import LocalCluster, free_port

    with LocalCluster(n_providers=1, capacity="256MiB", transport="verbs", slab_size="16MiB",
                      suspect_threshold=20.0, dead_threshold=60.0,
                      requester={"repatriate_rate": 0}) as cluster:  # remote pages stay remote
        for name, proc in cluster.procs.items():
            os.sched_setaffinity(proc.pid, {PEER_CPU})
            RESULTS["cpus"][f"provider process {name}"] = sorted(os.sched_getaffinity(proc.pid))
        cfg = C.load(cluster.config_path)
        cfg.nodes.append(C.NodeConfig(name="bench", address="127.0.0.1", port=free_port(), roles=["requester"],
                                      rdma_device=devices[1]))
        store = rram.connect(cfg, name="bench", local_budget=1 << 20)
        pool = store.create_pool()
        pages = make_pages(BW_PAGES, seed=5, mix={"random": 1.0})  # incompressible: 4 KiB READs
        idx = np.arange(BW_PAGES, dtype=np.uint64)
        store.put_many(pool, 1, idx, pages)
        store.put_many(pool, 2, idx, pages)  # pushes every page of object 1 out of the local pool
        yield store, pool
        store.close()


# -- helpers --------------------------------------------------------------------------------------


def latencies_us(benchmark) -> np.ndarray:
    return np.asarray(benchmark.stats.stats.data) * 1e6


def record(name: str, rram_value: float, unit: str, baseline_tool: str, baseline: dict, key: str, **extra):
    base = baseline.get(key)
    ok = base is not None and base > 0 and not baseline.get("suspect")
    ratio = rram_value / base if ok else None
    RESULTS["rows"].append({"metric": name, "rram": round(rram_value, 2), "unit": unit,
                            "perftest_tool": baseline_tool, "perftest_key": key, "perftest": base,
                            "ratio": None if ratio is None else round(ratio, 3), **extra})


# -- latency --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opcode,tool", [(OP_READ, "ib_read_lat"), (OP_WRITE, "ib_write_lat")], ids=["read", "write"])
def test_endpoint_latency(benchmark, lease, perftest, opcode, tool):
    ep, ops = lease
    one = ops(np.array([7]), opcode)
    out = new_completions(4)

    def post_poll():
        ep.post(one, 1)
        if ep.poll(out, 5.0) != 1 or out[0]["status"] != 0:
            raise AssertionError(f"completion {out[0]}")

    benchmark.pedantic(post_poll, rounds=LAT_ROUNDS, iterations=1, warmup_rounds=50)
    lat = latencies_us(benchmark)
    base = perftest(tool)
    record(f"{'READ' if opcode == OP_READ else 'WRITE'} 4 KiB latency p50, endpoint post+poll", float(np.median(lat)),
           "us", tool, base, "typical_us", rram_p99=round(float(np.percentile(lat, 99)), 2),
           perftest_p99=base.get("p99_us"))
    benchmark.extra_info.update(p50_us=float(np.median(lat)), perftest_typical_us=base.get("typical_us"))


def test_store_get_latency(benchmark, remote_store, perftest):
    store, pool = remote_store
    buf = bytearray(PAGE_SIZE)
    order = itertools.cycle(np.random.default_rng(2).permutation(BW_PAGES).tolist())
    before = store.stats()["remote_gets"]

    def get_one():
        store.get(pool, 1, next(order), out=buf)

    benchmark.pedantic(get_one, rounds=LAT_ROUNDS, iterations=1, warmup_rounds=50)
    remote = store.stats()["remote_gets"] - before
    assert remote == LAT_ROUNDS + 50, f"only {remote} of {LAT_ROUNDS + 50} gets went remote"
    lat = latencies_us(benchmark)
    base = perftest("ib_read_lat")
    record("READ 4 KiB latency p50, store.get of a remote page", float(np.median(lat)), "us", "ib_read_lat",
           base, "typical_us", rram_p99=round(float(np.percentile(lat, 99)), 2), perftest_p99=base.get("p99_us"))


# -- throughput -----------------------------------------------------------------------------------


@pytest.mark.parametrize("opcode,tool", [(OP_READ, "ib_read_bw"), (OP_WRITE, "ib_write_bw")], ids=["read", "write"])
def test_endpoint_throughput(benchmark, lease, perftest, opcode, tool):
    ep, ops = lease
    rng = np.random.default_rng(3)
    batches = [ops(rng.permutation(REGION_PAGES)[:BATCH], opcode) for _ in range(DEPTH * 2)]
    n_batches = BW_PAGES // BATCH
    out = new_completions(DEPTH)

    def move():
        posted = done = 0
        while done < n_batches:
            while posted < n_batches and posted - done < DEPTH:
                ep.post(batches[posted % len(batches)], posted)
                posted += 1
            n = ep.poll(out, 10.0)
            if n == 0 or (out["status"][:n] != 0).any():
                raise AssertionError(f"batch failed or timed out: {out[:n]}")
            done += n

    benchmark.pedantic(move, rounds=5, iterations=1, warmup_rounds=1)
    rate = BW_PAGES / benchmark.stats.stats.median
    base = perftest(tool)
    record(f"{'READ' if opcode == OP_READ else 'WRITE'} 4 KiB throughput, endpoint batch {BATCH} x {DEPTH} in flight",
           rate, "pages/s", tool, base, "msgs_per_s", perftest_bw=_bw(base))


def test_store_get_many_throughput(benchmark, remote_store, perftest):
    store, pool = remote_store
    idx = np.arange(BW_PAGES, dtype=np.uint64)
    out = np.empty(BW_PAGES * PAGE_SIZE, dtype=np.uint8)
    benchmark.pedantic(lambda: store.get_many(pool, 1, idx, out), rounds=5, iterations=1, warmup_rounds=1)
    rate = BW_PAGES / benchmark.stats.stats.median
    base = perftest("ib_read_bw")
    record(f"READ throughput, store.get_many of remote pages (batch {store.batch}, one in flight)", rate,
           "pages/s", "ib_read_bw", base, "msgs_per_s", perftest_bw=_bw(base))


def _bw(result: dict) -> str | None:
    for key, value in result.items():
        if key.startswith("bw_average_"):
            return f"{value} {key.removeprefix('bw_average_')}"
    return None


# -- report ---------------------------------------------------------------------------------------


def markdown(res: dict) -> str:
    lines = [f"rram vs perftest, devices {res['devices']['requester']} (requester) -> "
             f"{res['devices']['provider']} (provider), kernel {res['host']['kernel']}, {res['host']['cpus']} vCPUs",
             "", "| metric | rram | perftest | ratio rram/perftest |", "| --- | --- | --- | --- |"]
    for r in res["rows"]:
        base = r["perftest"]
        base_s = "n/a" if base is None else f"{base:,.2f} ({r['perftest_tool']} {r['perftest_key']})"
        if r.get("perftest_bw"):
            base_s += f", avg BW {r['perftest_bw']}"
        rram_s = f"{r['rram']:,.2f} {r['unit']}"
        if "rram_p99" in r:
            rram_s += f" (p99 {r['rram_p99']:,.1f})"
        ratio = "n/a (perftest figure missing or suspect)" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['metric']} | {rram_s} | {base_s} | {ratio} |")
    lines += ["", "Ratios: latency rows rram p50 / perftest t_typical (above 1: rram slower); throughput rows "
              "rram pages/s / perftest message rate (above 1: rram faster). ib_write_lat reports half a "
              "ping-pong round trip, rram's WRITE waits for the ACK of one op. Both sides run under qemu TCG "
              "with soft-RoCE: the figures compare software overheads, not RDMA hardware.",
              "", "Pinning (CPUs allowed; perftest: allowed / last ran on):"]
    for who, cpus in res["cpus"].items():
        lines.append(f"* {who}: {cpus}")
    for tool, p in res["perftest"].items():
        c = p["cpus"]
        lines.append(f"* {tool}: server {c['server']['allowed']}/{c['server']['last_cpu']}, "
                     f"client {c['client']['allowed']}/{c['client']['last_cpu']}"
                     + (" (SUSPECT output, raw kept in JSON)" if p.get("suspect") else ""))
    return "\n".join(lines) + "\n"
