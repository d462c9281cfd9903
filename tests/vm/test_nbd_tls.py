"""The kernel's NBD client over TLS (the soft-RoCE VM has /dev/nbd*): Debian's nbd-client does
STARTTLS with a client certificate against `rram requester --nbd-tls`, attaches /dev/nbd1 and
the block device reads back what was written, by checksum; without the certificate it is refused.
nbd-client dials the requester's unix socket, which requires TLS as its TCP listener does: in
the guest, nbd-client's getaddrinfo (AI_ADDRCONFIG) finds no IPv4 for 127.0.0.1.

Certificates come from `rram keys tls` signed by the cluster's CA (LocalCluster makes it).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from rram.testing.cluster import _ROOT, LocalCluster
from tests.conftest import require_or_skip

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1 << 20
DEV = "/dev/nbd1"  # test_nbd_swap.py uses nbd0
EXPORT = 64 * MiB
WRITE = 16 * MiB


def _reason() -> str | None:
    if os.geteuid() != 0:
        return "attaching an NBD device needs root"
    if not os.path.exists(DEV):
        subprocess.run(["modprobe", "nbd", "nbds_max=4"], capture_output=True)
    if not os.path.exists(DEV):
        return f"{DEV} is missing: no kernel NBD client here (run in the soft-RoCE VM, scripts/rxe-vm/run)"
    if shutil.which("nbd-client") is None:
        return "nbd-client is not installed"
    return None


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))


def _rram(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "rram", *args], capture_output=True, text=True, timeout=60,
                          env=_env())
    assert proc.returncode == 0, proc.stderr


def _sha256(path: str, length: int) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
        done = 0
        while done < length:
            n = os.readv(fd, [buf])
            assert n > 0
            h.update(buf[:n])
            done += n
    finally:
        os.close(fd)
    return h.hexdigest()


def test_nbd_client_over_tls_reads_back_what_it_wrote():
    require_or_skip(_reason())
    tmp = tempfile.mkdtemp(prefix="rram-vmtls-")
    with LocalCluster(n_providers=2, capacity="96MiB", transport="tcp", workdir=tmp, slab_size="1MiB",
                      verbose=False, requester={"local_budget": "2MiB"}) as cluster:
        server_dir, client_dir = os.path.join(tmp, "server"), os.path.join(tmp, "client")
        _rram("keys", "tls", "req", "--server", "--host", "127.0.0.1", "--out", server_dir,
              "--config", cluster.config_path)
        _rram("keys", "tls", "vm", "--client", "--out", client_dir, "--config", cluster.config_path)
        sock = os.path.join(tmp, "nbd.sock")
        log_path = os.path.join(tmp, "requester.log")
        with open(log_path, "w") as log:
            req = subprocess.Popen([sys.executable, "-m", "rram.frontends.requester", "--config", cluster.config_path,
                                    "--name", "req", "--export-size", str(EXPORT), "--socket", sock,
                                    "--nbd-tls", server_dir, "--no-mlock"],
                                   stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True, env=_env())
        attached = False
        try:
            assert "tls=required" in req.stdout.readline()
            # without a certificate: refused before any export is offered
            plain = subprocess.run(["nbd-client", "-unix", sock, DEV, "-b", "4096"],
                                   capture_output=True, text=True, timeout=30)
            assert plain.returncode != 0 and "requires TLS" in plain.stdout + plain.stderr, plain.stdout + plain.stderr
            tls = ["-certfile", f"{client_dir}/client-cert.pem", "-keyfile", f"{client_dir}/client-key.pem",
                   "-cacertfile", f"{client_dir}/ca-cert.pem", "-tlshostname", "127.0.0.1"]
            up = subprocess.run(["nbd-client", "-unix", sock, DEV, "-b", "4096", *tls],
                                capture_output=True, text=True, timeout=60)
            assert up.returncode == 0, up.stdout + up.stderr
            attached = True
            data, payload = os.path.join(tmp, "data"), os.urandom(WRITE)
            with open(data, "wb") as f:
                f.write(payload)
            subprocess.run(["dd", f"if={data}", f"of={DEV}", "bs=1M", "oflag=direct", "conv=fsync"], check=True,
                           capture_output=True, timeout=120)
            assert _sha256(DEV, WRITE) == hashlib.sha256(payload).hexdigest()
            stats = cluster.provider_stats("nbd-tls-vm-observer")
            assert sum(s["used"] for s in stats.values()) >= 4 * MiB  # the pages went to the providers
        finally:
            if attached:
                subprocess.run(["nbd-client", "-d", DEV], capture_output=True, timeout=60)
            req.send_signal(signal.SIGTERM)
            try:
                req.wait(30)
            except subprocess.TimeoutExpired:
                req.kill()
                req.wait()
            req.stdout.close()
    shutil.rmtree(tmp, ignore_errors=True)
