"""Write the seed corpus of every fuzz target (tests/fuzz/corpus/<target>/), from rram's own encoders.

    python -m tests.fuzz.seeds          # rewrite the seeds (seed-* files; found inputs are kept)

Each seed is a valid stream (or a valid stream with one deliberate fault) the way a real peer
would send it, so that the fuzzers start deep in each parser instead of at its first check.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from rram import config
from rram.control import auth
from rram.control import messages as M
from rram.frontends.nbd import protocol as P
from rram.transport import wire
from rram.transport.base import OP_READ, OP_WRITE, WC_REM_ACCESS_ERR, WC_SUCCESS
from tests.fuzz import fixed
from tests.fuzz.driver import CORPUS, ROOT

NONCE = "cd" * auth.NONCE_SIZE
KEY = bytes(range(32))  # targets/tcp_server.py and data_frames.py KEY
REQUESTER_KEY = bytes(range(32, 64))  # targets/tcp_requester.py KEY


def control_frames() -> dict[str, bytes]:
    reqs = {
        "hello": dict(requester="app1", role="requester", generation=1, nonce=NONCE),
        "auth": dict(mac="ab" * 32), "alloc_slab": dict(size=1 << 20), "free_slab": dict(lease=3),
        "connect": dict(params={"transport": "verbs", "qpn": 17, "psn": 5, "mtu": 3, "gid": "fe80" + "00" * 14,
                                "replaces": 16}), "stats": {}, "heartbeat": {},
        "resume": dict(session="s1", token="00ff"), "drain": {}, "reclaim": dict(bytes=4096),
        "report": dict(degraded=1), "undrain": {}, "shutdown": {}, "reload": {}, "bye": {},
    }
    out = {f"request-{k}": M.encode(M.request(k, i, **f)) for i, (k, f) in enumerate(reqs.items())}
    replies = {
        "hello": dict(challenge=NONCE),
        "auth": dict(node="p0", incarnation=2, transport="tcp", capacity=1 << 30, session="s", token="t", proof="p"),
        "alloc_slab": dict(lease=1, addr=1 << 40, length=1 << 20, rkey=8192),
        "heartbeat": dict(incarnation=1, capacity=1 << 30, free=1 << 29, load=0.5, state="serving"),
        "resume": dict(session="s", token="t", leases=[{"lease": 1, "addr": 4096, "length": 4096, "rkey": 2}]),
        "stats": dict(stats={"requests": 3, "nested": {"a": [1, 2.5, None, True]}}),
    }
    for i, (k, f) in enumerate(replies.items()):
        out[f"reply-{k}"] = M.encode(M.reply(i, **f))
    out["reply-error"] = M.encode(M.error_reply(4, "capacity", "full"))
    out["handshake"] = out["request-hello"] + out["request-auth"] + out["request-heartbeat"]
    out["unicode-name"] = M.encode(M.request("hello", 1, requester="\u00e9\u4e2d", role="operator", generation=7,
                                             nonce=NONCE))
    body = json.dumps({"v": 1, "type": "hello", "id": 1, "requester": "a\ud800", "role": "requester",
                       "generation": 1, "nonce": NONCE}).encode()
    out["surrogate-name"] = M.LENGTH.pack(len(body)) + body
    body = json.dumps({"v": 1, "type": "alloc_slab", "id": 2, "size": 1e300}).encode()
    out["float-size"] = M.LENGTH.pack(len(body)) + body
    body = b'{"v":1,"type":"stats","id":1,"x":' + b"[" * 40 + b"]" * 40 + b"}"
    out["nested"] = M.LENGTH.pack(len(body)) + body
    return out


def _ops(spec) -> np.ndarray:
    ops = np.zeros(len(spec), dtype=wire.WIRE_OP)
    for i, (opcode, off, length) in enumerate(spec):
        ops[i] = (fixed.REGION + off, length, fixed.FIRST_KEY, opcode, (0,) * 7)
    return ops


def data_frames() -> dict[str, bytes]:
    """Frames both ways; the REQUESTs name the tcp_server target's region, signed with its KEY."""
    read = _ops([(OP_READ, 0, 64)])
    mixed = _ops([(OP_WRITE, 0, 16), (OP_READ, 100, 32), (OP_WRITE, 4000, 96), (OP_READ, 4095, 1)])
    bad = _ops([(OP_READ, 4000, 200), (OP_WRITE, 0, 0), (7, 0, 8)])
    out = {
        "read": wire.request(1, read, key=KEY, seq=0),
        "mixed": wire.request(2, mixed, bytes(range(112)), key=KEY, seq=0),
        "pipelined": b"".join(wire.request(10 + i, mixed if i % 2 else read,
                                           bytes(112) if i % 2 else b"", key=KEY, seq=i) for i in range(4)),
        "out-of-bounds": wire.request(3, bad, bytes(0), key=KEY, seq=0),
        "unsigned": wire.request(4, mixed, bytes(112)),
        "hello": wire.hello(bytes(32), bytes(range(32))),
        "challenge": wire.challenge(bytes(32)),
        "hello-ok": wire.hello_ok(bytes(32)),
        "completion": wire.completion(7, WC_SUCCESS, 3, bytes(64 + 128)),
        "completion-failed": wire.completion(7, WC_REM_ACCESS_ERR, 1, bytes(64)),
        "completions-signed": wire.completion(7, WC_SUCCESS, 3, bytes(192), key=KEY, seq=0)
        + wire.completion(8, WC_REM_ACCESS_ERR, 0, key=KEY, seq=1),
        "completion-replayed": wire.completion(7, WC_SUCCESS, 1, bytes(64), key=KEY, seq=0) * 2,
        "error": wire.error(wire.E_BAD_FRAME, "bad magic"),
    }
    out["truncated"] = out["mixed"][:50]
    return out


def tcp_requester() -> dict[str, bytes]:
    """Answers to the batches targets/tcp_requester.py posts: 7 reads 64 + 128 bytes, 8 reads 4096."""
    ok7 = wire.completion(7, WC_SUCCESS, 3, bytes(range(192)))

    def signed(batch_id, status, index, data=b"", seq=0):
        return wire.completion(batch_id, status, index, data, key=REQUESTER_KEY, seq=seq)

    sok7 = signed(7, WC_SUCCESS, 3, bytes(range(192)))
    return {
        "signed-both": sok7 + signed(8, WC_SUCCESS, 1, bytes(4096), seq=1),
        "signed-first-fails": signed(7, WC_REM_ACCESS_ERR, 1, bytes(64)) + signed(8, WC_SUCCESS, 1, bytes(4096), seq=1),
        "signed-then-error": sok7 + wire.error(wire.E_SHUTDOWN, "provider shutting down"),
        "signed-replayed": sok7 + sok7,
        "signed-out-of-order": signed(7, WC_SUCCESS, 3, bytes(range(192)), seq=1) + signed(8, WC_SUCCESS, 1,
                                                                                             bytes(4096)),
        "both": ok7 + wire.completion(8, WC_SUCCESS, 1, bytes(4096)),
        "first-fails": wire.completion(7, WC_REM_ACCESS_ERR, 1, bytes(64)) + wire.completion(8, WC_SUCCESS, 1,
                                                                                              bytes(4096)),
        "then-error": ok7 + wire.error(wire.E_SHUTDOWN, "provider shutting down"),
        "wrong-batch": wire.completion(8, WC_SUCCESS, 1, bytes(4096)),
        "hello-ok": wire.hello_ok(bytes(32)),
        "one": ok7,
    }


def _opt(option: int, data: bytes = b"") -> bytes:
    return P.OPTION.pack(P.IHAVEOPT, option, len(data)) + data


def _go(name: str = "", infos=()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def _req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 1, data: bytes = b"") -> bytes:
    return P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def nbd() -> dict[str, bytes]:
    flags = struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
    go = _opt(P.NBD_OPT_GO, _go("", (P.NBD_INFO_BLOCK_SIZE, P.NBD_INFO_NAME)))
    structured = _opt(P.NBD_OPT_STRUCTURED_REPLY)
    reads = b"".join(_req(P.NBD_CMD_READ, 4096 * i, 4096, handle=i) for i in range(4))
    writes = b"".join(_req(P.NBD_CMD_WRITE, 8192 * i, 4096, P.NBD_CMD_FLAG_FUA * i, i, bytes(4096)) for i in range(2))
    others = (_req(P.NBD_CMD_FLUSH) + _req(P.NBD_CMD_TRIM, 0, 4096) + _req(P.NBD_CMD_WRITE_ZEROES, 4096, 8192, 2)
              + _req(P.NBD_CMD_READ, 512, 512) + _req(9, 0, 0) + _req(P.NBD_CMD_READ, 1 << 40, 4096))
    return {
        "go-reads": flags + structured + go + reads + _req(P.NBD_CMD_DISC),
        "go-writes": flags + go + writes + reads[:56],
        "go-others": flags + structured + go + others,
        "options": flags + _opt(P.NBD_OPT_LIST) + _opt(P.NBD_OPT_INFO, _go("rram", (0, 1, 2, 3))) + _opt(
            P.NBD_OPT_STARTTLS) + _opt(99, b"xyz") + _opt(P.NBD_OPT_ABORT),
        "starttls": flags + _opt(P.NBD_OPT_LIST) + _opt(P.NBD_OPT_STARTTLS) + structured + go + reads,
        "export-name": struct.pack(">I", P.NBD_FLAG_C_FIXED_NEWSTYLE) + _opt(P.NBD_OPT_EXPORT_NAME, b"rram") + reads,
        "big-write": flags + go + _req(P.NBD_CMD_WRITE, 0, 128 << 10, handle=5) + bytes(200) + _req(P.NBD_CMD_DISC),
        "overlap": flags + go + _req(P.NBD_CMD_WRITE, 4096, 4096, 0, 1, bytes(4096)) + _req(P.NBD_CMD_WRITE, 4096, 4096,
                                                                                            0, 2, bytes(4096)),
    }


def config_files() -> dict[str, bytes]:
    with open(os.path.join(ROOT, "examples", "cluster.yaml"), "rb") as f:
        example = f.read()
    small = {"secret": "s3cret", "nodes": [{"name": "p0", "address": "127.0.0.1", "port": 7001, "capacity": "64MiB"},
                                           {"name": "r", "address": "127.0.0.1", "port": 7002,
                                            "roles": ["requester"]}],
             "limits": {"io_budget": "8MiB", "max_connections": 4}, "requester": {"heartbeat_timeout": 0.5},
             "quotas": {"app": "1GiB"}, "revoked": {"old": 2}}
    cfg = config.from_dict(small)
    return {"example": example, "small": config.dump(cfg).encode(),
            "flow": b"{secret: x, nodes: [{name: a, address: h, port: 1, capacity: 4k}], hugepages: off}\n",
            "anchors": b"a: &x {name: n}\nnodes: [*x, *x]\nsecret: s\n",
            "floats": b"secret: s\nlease_grace: .nan\nheartbeat_interval: 0.5\ndead_threshold: .inf\n"
                      b"suspect_threshold: 100000000000000000000000000000\nnodes: []\n",
            "tags": b"secret: !!str s\nreplicas: !!int 0x1\nlease_grace: !!float 2.5\nslab_size: !!int 1_048_576\n"
                    b"nodes: !!seq []\nrequester: !!map {}\nlimits: {}\nname: !!timestamp 2001-12-14\n"}


def farmem_wire() -> dict[str, bytes]:
    msgs = [{"op": "hello", "name": "r", "size": 1 << 23, "budget": 1 << 21, "minor": True, "spin_us": 0,
             "store": {"local_budget": 1 << 20}}, {"op": "stats"}, {"op": "prefetch", "offset": 4096, "length": 1 << 20},
            {"op": "prefetch", "offset": -1, "length": 1 << 40}, {"op": "advise", "advice": "sequential"},
            {"op": "close"}]
    lines = b"".join(json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in msgs)
    return {"session": lines, "partial": lines[:-7], "not-object": b"[1,2]\n", "nested": b"[" * 50 + b"\n"}


TARGETS = {"control_frames": control_frames, "data_frames": data_frames, "tcp_server": data_frames,
           "tcp_requester": tcp_requester, "nbd": nbd, "config": config_files, "farmem_wire": farmem_wire}


def main() -> None:
    for target, make in TARGETS.items():
        d = os.path.join(CORPUS, target)
        os.makedirs(d, exist_ok=True)
        for name in os.listdir(d):
            if name.startswith("seed-"):
                os.unlink(os.path.join(d, name))
        for name, data in make().items():
            with open(os.path.join(d, f"seed-{name}"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
