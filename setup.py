"""Build rram and its Cython extensions.

Each extension names the system library it needs.  We probe for it (pkg-config, then the
compiler) and say plainly what was built and what was not, and why; a missing optional
library leaves a working package that falls back (codec -> python-lz4) or reports the
transport as unavailable (verbs).

Environment:
  RRAM_ONLY=_codec,_slab   build only these extensions (development; the table is rram/_ext/native.py)
  RRAM_REQUIRE=all|_verbs,...   fail instead of skipping when these cannot be built
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


# the table lives in the package so that rram.build_info reports exactly what is built here
NATIVE = runpy.run_path(os.path.join(HERE, "rram", "_ext", "native.py"))["NATIVE"]


def say(msg: str) -> None:
    print(f"rram setup: {msg}", file=sys.stderr)


def pkg_config(lib: str) -> tuple[str | None, list[str], list[str]]:
    """(version, cflags, libs) from pkg-config, or (None, [], [])."""
    if not shutil.which("pkg-config"):
        return None, [], []
    try:
        version = subprocess.check_output(["pkg-config", "--modversion", lib], text=True, stderr=subprocess.DEVNULL).strip()
        cflags = subprocess.check_output(["pkg-config", "--cflags", lib], text=True).split()
        libs = subprocess.check_output(["pkg-config", "--libs", lib], text=True).split()
        return version, cflags, libs
    except subprocess.CalledProcessError:
        return None, [], []


def compiles_with(header: str, link: list[str]) -> bool:
    """True when a program including ``header`` and linking ``link`` builds."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(f"#include <{header}>\nint main(void) {{ return 0; }}\n")
        cmd = [cc, src, "-o", os.path.join(tmp, "probe")] + [f"-l{lib}" for lib in link]
        return subprocess.run(cmd, capture_output=True).returncode == 0


def extensions() -> list[Extension]:
    only = {n for n in os.environ.get("RRAM_ONLY", "").split(",") if n}
    require = os.environ.get("RRAM_REQUIRE", "")
    required = {n.name for n in NATIVE} if require == "all" else {n for n in require.split(",") if n}
    exts = []
    for nat in NATIVE:
        if only and nat.name not in only:
            continue
        src = os.path.join("ext", f"{nat.name}.pyx")
        if not os.path.exists(os.path.join(HERE, src)):
            say(f"skipping {nat.name}: {src} does not exist yet")
            continue
        kwargs: dict = {"include_dirs": ["ext"], "extra_compile_args": ["-O3"]}
        if nat.library:
            version, cflags, libs = pkg_config(nat.library)
            if version is None and not compiles_with(nat.header, nat.link):
                reason = f"{nat.library} not found (Debian: apt-get install {nat.library}-dev, or run scripts/setup.sh)"
                if not nat.optional or nat.name in required:
                    raise SystemExit(f"rram setup: cannot build {nat.name} ({nat.why}): {reason}")
                say(f"NOT building {nat.name} ({nat.why}): {reason}")
                continue
            kwargs["libraries"] = nat.link
            kwargs["extra_compile_args"] += [c for c in cflags if c.startswith("-I")]
            say(f"building {nat.name} ({nat.why}) against {nat.library} {version or '(found by the compiler)'}")
        else:
            say(f"building {nat.name} ({nat.why})")
        exts.append(Extension(f"rram._ext.{nat.name}", [src], **kwargs))
    if not exts:
        return []
    from Cython.Build import cythonize

    return cythonize(
        exts,
        language_level=3,
        include_path=["ext", HERE],
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True, "embedsignature": True},
        quiet=True,
    )


setup(
    name="rram",
    version="0.1.0",
    description="RDMA-accelerated remote memory: keep compressed pages in other machines' idle RAM",
    packages=find_packages(include=["rram", "rram.*"]),
    package_data={"rram": ["py.typed"]},
    ext_modules=extensions(),
    python_requires=">=3.10",
    install_requires=["numpy", "lz4>=4", "pyyaml>=6", "prometheus_client", "rich", "tqdm",
                      "cryptography>=41"],  # rram keys: the cluster CA and certificates (rram/tls.py)
    extras_require={"test": ["pytest>=8", "hypothesis", "pytest-benchmark", "pytest-timeout", "atheris"],
                    "bench": ["pytest-benchmark", "matplotlib"]},
    entry_points={"console_scripts": ["rram=rram.cli:main"]},
    zip_safe=False,
)
