"""Run one fuzz target: libFuzzer through atheris when it is installed, else a mutational loop.

Each target module under tests/fuzz/targets/ defines ``one_input(data: bytes) -> None`` and
``MODULES`` (the rram modules whose Python code atheris instruments for coverage), and ends with
``driver.main(__name__, one_input, MODULES)``.  Run one as a module from the repository root::

    python -m tests.fuzz.targets.control_frames -runs=100000 /tmp/out tests/fuzz/corpus/control_frames

The oracle is the target's: the parser returns a valid value or raises the project's typed
error (rram.errors); any other exception, a crash, an input that takes longer than
``-timeout`` seconds or an RSS over ``-rss_limit_mb`` is a finding (libFuzzer writes the
input to ``crash-*``/``timeout-*``/``oom-*`` and exits non-zero).

The fallback (no atheris: it has no wheel for every Python) takes the same arguments that
matter here (-runs, -max_total_time, -timeout, -seed, corpus directories), mutates corpus
inputs at random (bit flips, byte sets, inserts, deletes, splices, duplicated chunks) and
reports a finding the same way: the input in ``crash-<sha1>`` and exit code 1.  It has no
coverage feedback, so it explores less; it still keeps the short CI run meaningful.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sys
import time
import traceback

try:
    import atheris
except ImportError:  # the fallback loop below runs the same targets
    atheris = None

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus")
MAX_LEN = 12 << 10  # an NBD handshake and two 4 KiB WRITEs; more only slows every target


def instrumented(*also: str):
    """Import the target's modules inside this: atheris adds coverage counters to rram's code
    (and to the pure-Python libraries named in ``also``, such as yaml for the cluster file)."""
    if atheris is None or os.environ.get("RRAM_FUZZ_NO_INSTRUMENT") == "1":
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=["rram", *also])


def corpus(target: str) -> list[bytes]:
    """The checked-in inputs of ``target`` (the live-server tests mutate them too)."""
    return _load([os.path.join(CORPUS, target)])


def main(name: str, one_input, argv: list[str] | None = None) -> None:
    if name != "__main__":
        return
    argv = list(sys.argv if argv is None else argv)
    if atheris is not None and os.environ.get("RRAM_FUZZ_ENGINE") != "mutate":
        if not any(a.startswith("-max_len=") for a in argv):
            argv.insert(1, f"-max_len={MAX_LEN}")
        # libFuzzer's -merge re-runs argv[0] through the shell: make it run this module again
        module = os.path.relpath(os.path.abspath(argv[0]), ROOT).removesuffix(".py").replace(os.sep, ".")
        argv[0] = f"cd {ROOT} && {sys.executable} -m {module}"
        atheris.Setup(argv, one_input)
        atheris.Fuzz()
    sys.exit(_mutate_loop(one_input, argv[1:]))


# -- the fallback engine ------------------------------------------------------------------------


def _options(args: list[str]) -> tuple[dict, list[str]]:
    opts, dirs = {}, []
    for a in args:
        if a.startswith("-") and "=" in a:
            k, v = a[1:].split("=", 1)
            opts[k] = v
        else:
            dirs.append(a)
    return opts, dirs


def _load(dirs: list[str]) -> list[bytes]:
    seeds = []
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            with open(os.path.join(d, f), "rb") as fh:
                seeds.append(fh.read(MAX_LEN))
    return seeds or [b""]


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            pos %= len(b)
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # an interesting byte
            pos %= len(b)
            b[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert random bytes
            b[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and b:  # delete a range
            del b[pos : pos + rng.randrange(1, 17)]
        elif op == 4:  # splice another seed
            other = rng.choice(seeds)
            start = rng.randrange(len(other) + 1)
            b[pos:pos] = other[start : start + rng.randrange(1, 65)]
        elif op == 5 and b:  # duplicate a chunk
            start = rng.randrange(len(b))
            b[pos:pos] = b[start : start + rng.randrange(1, 33)]
        elif op == 6 and len(b) >= 4:  # an interesting 32-bit value, either byte order
            pos = rng.randrange(len(b) - 3)
            v = rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 4096, 1 << 20, rng.randrange(1 << 32)))
            b[pos : pos + 4] = v.to_bytes(4, rng.choice(("little", "big")))
    return bytes(b[:MAX_LEN])


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _mutate_loop(one_input, args: list[str]) -> int:
    opts, dirs = _options(args)
    runs = int(opts.get("runs", "-1"))
    max_time = float(opts.get("max_total_time", "0"))
    timeout = float(opts.get("timeout", "1"))
    rng = random.Random(int(opts.get("seed", "0")) or None)
    seeds = _load(dirs)
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.monotonic()
    n = 0
    while runs < 0 or n < runs:
        if max_time and time.monotonic() - t0 > max_time:
            break
        data = seeds[n] if n < len(seeds) else mutate(rng, rng.choice(seeds), seeds)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            one_input(data)
        except BaseException as exc:  # noqa: BLE001 - every escape is a finding
            signal.setitimer(signal.ITIMER_REAL, 0)
            kind = "timeout" if isinstance(exc, _Hang) else "crash"
            path = f"{kind}-{hashlib.sha1(data).hexdigest()}"
            with open(path, "wb") as f:
                f.write(data)
            traceback.print_exc()
            print(f"==FINDING== {kind} after {n} inputs; input written to {path}", file=sys.stderr)
            return 1
        signal.setitimer(signal.ITIMER_REAL, 0)
        n += 1
    dt = time.monotonic() - t0
    print(f"Done {n} runs in {dt:.0f} second(s) ({n / max(dt, 1e-9):.0f} exec/s, mutate engine)", file=sys.stderr)
    return 0
