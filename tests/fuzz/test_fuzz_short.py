"""The short CI fuzz run: every target for a few thousand inputs from the checked-in corpus
(scripts/fuzz.sh --long is the long run).  Any finding fails the test with the target's output;
the input that found it is left in the test's tmp_path."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.fuzz import driver, seeds

TARGETS = sorted(f[:-3] for f in os.listdir(os.path.join(driver.ROOT, "tests", "fuzz", "targets"))
                 if f.endswith(".py") and not f.startswith("_"))
#: inputs per target; each also stops after 7 s, so that the seven stay under a minute on a loaded
#: machine (about 20 s on an idle 2-core one)
RUNS = 15000


def fuzz(target: str, tmp_path, runs: int, engine: str | None = None) -> str:
    env = dict(os.environ)
    if engine:
        env["RRAM_FUZZ_ENGINE"] = engine
    out = tmp_path / "new"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", f"tests.fuzz.targets.{target}", f"-runs={runs}", "-max_total_time=7", "-timeout=1",
         "-rss_limit_mb=2048", "-seed=1", f"-artifact_prefix={tmp_path}/", str(out),
         os.path.join(driver.CORPUS, target)],
        cwd=driver.ROOT, env=env, capture_output=True, text=True, timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzz target {target} found something:\n{log[-4000:]}"
    return log


@pytest.mark.timeout(150)
@pytest.mark.parametrize("target", TARGETS)
def test_target_survives_a_short_run(target, tmp_path):
    log = fuzz(target, tmp_path, RUNS)
    done = re.search(r"Done (\d+) runs", log)
    assert done and int(done.group(1)) > 0, log[-2000:]


def test_the_fallback_engine_runs_without_atheris(tmp_path):
    log = fuzz("data_frames", tmp_path, 300, engine="mutate")
    assert "Done 300 runs" in log and "mutate engine" in log, log[-2000:]


def test_checked_in_seeds_are_what_the_encoders_make_today():
    """tests/fuzz/seeds.py writes them: rerun it when a wire format changes.  (The copy of
    examples/cluster.yaml may lag behind the example: it is a seed, not a specification.)"""
    for target, make in seeds.TARGETS.items():
        for name, data in make().items():
            if (target, name) == ("config", "example"):
                continue
            with open(os.path.join(driver.CORPUS, target, f"seed-{name}"), "rb") as f:
                assert f.read() == data, f"{target}/seed-{name} is stale: run python -m tests.fuzz.seeds"
