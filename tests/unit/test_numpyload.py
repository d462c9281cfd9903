"""rram.testing.numpyload: the benchmark workload's expected results are right, and a page lost
or zero-filled anywhere changes them (a wrong answer cannot pass for a fast one)."""
from __future__ import annotations

import json

import numpy as np

from rram.testing import numpyload as L

N = 3 * L.CHUNK  # three 1 MiB chunks


def test_fill_pages_writes_what_values_says():
    out = np.empty(L.CHUNK, dtype=np.uint64)
    L.fill_pages(out, 2 * L.CHUNK)
    assert (out == L.values(np.arange(2 * L.CHUNK, 3 * L.CHUNK))).all()
    pages = out.reshape(-1, L.PAGE_WORDS)
    assert len(np.unique(pages[:, :256])) == pages[:, :256].size  # first halves: distinct words
    assert (pages[:, 256:] == pages[:, 256:257]).all()  # second halves: the page's tag


def test_passes_match_the_plan_and_a_lost_page_is_caught():
    p = L.plan(N, seed=3)
    a = np.empty(N, dtype=np.uint64)
    seconds, got = L.run_passes(a, p)
    assert got == p["expect"] and set(seconds) == {"fill", "sum", "update", "gather", "sum_after_update"}
    a[5 * L.PAGE_WORDS:6 * L.PAGE_WORDS] = 0  # one page read back as zeros
    assert int(a.sum(dtype=np.uint64)) != p["expect"]["sum_after_update"]


def test_main_plain_prints_a_checked_summary(capsys):
    assert L.main(["--mib", "2", "--where", "plain"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] and summary["wrong"] == {} and summary["mib"] == 2
