"""Imports only point down: every rram module has a declared floor, and no import (function-local
ones included) reaches a higher floor, a sibling package on the same floor, or a private name of
another module.  docs/architecture.md draws the same floors.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: (floor, group, module prefixes), bottom up.  Groups on one floor do not import each other.
LAYERS = [
    (0, "base", ("rram.units", "rram.errors", "rram.config", "rram.memory", "rram.metrics", "rram.logsetup", "rram.tls",
                 "rram._ext")),
    (1, "transport", ("rram.transport",)),
    (2, "datapath", ("rram.datapath",)),
    (2, "control", ("rram.control",)),
    (3, "provider", ("rram.provider",)),
    (3, "composition root", ("rram.cluster",)),
    (4, "frontends", ("rram.frontends",)),
    (5, "package face", ("rram",)),  # rram/__init__.py: hands on PAGE_SIZE, connect, FarMemory ...
    (5, "testing", ("rram.testing",)),
    (6, "entry points", ("rram.cli", "rram.demo", "rram.__main__")),
]

#: the wrappers of the compiled extensions: nothing else imports rram._ext._* (rram._ext.native,
#: the plain table of what setup.py builds, is data anyone may read); frontends.nbd wraps its
#: wire format (_nbdwire), frontends.farmem the userfaultfd calls (_uffd)
EXT_USERS = ("rram.transport", "rram.datapath", "rram.frontends.nbd", "rram.frontends.farmem")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str):
    best = None
    for floor, group, prefixes in LAYERS:
        for p in prefixes:
            hit = module == p if p == "rram" else module == p or module.startswith(p + ".")
            if hit and (best is None or len(p) > best[2]):
                best = (floor, group, len(p))
    return None if best is None else best[:2]


def _is_module(name: str, root: Path) -> bool:
    if name.startswith("rram._ext._"):
        return name.count(".") == 2  # compiled: rram/_ext/_*.so (sources in ext/*.pyx)
    rel = Path(*name.split("."))
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()


def imports(path: Path, root: Path):
    """(line, target module, private name or None, bound name) for every import in ``path``."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "rram":
                    yield node.lineno, a.name, None, a.asname
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != "rram":
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if _is_module(sub, root):
                    private = a.name if a.name.startswith("_") and src != "rram._ext" else None
                    yield node.lineno, sub, private, a.asname or a.name
                else:
                    private = a.name if a.name.startswith("_") and not a.name.startswith("__") else None
                    yield node.lineno, src, private, None


def private_attributes(path: Path, root: Path):
    """(line, module, name) where ``path`` reads ``mod._name`` of a module it imported."""
    bound = {b: target for _, target, _, b in imports(path, root) if b and _is_module(target, root)}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            target = bound[node.value.id]
            if node.attr.startswith("_") and not node.attr.startswith("__") and target != module_name(path, root):
                yield node.lineno, target, node.attr


def violations(root: Path) -> list[str]:
    out = []
    graph: dict[str, set[str]] = {}
    for path in sorted((root / "rram").rglob("*.py")):
        me = module_name(path, root)
        where = path.relative_to(root)
        mine = layer_of(me)
        if mine is None:
            out.append(f"{where}: module {me} has no floor: add it to LAYERS (and to docs/architecture.md)")
            continue
        for line, target, private, _ in imports(path, root):
            if private and target != me:
                out.append(f"{where}:{line}: takes private name {private} from {target}")
            if target.startswith("rram._ext._") and not me.startswith(EXT_USERS):
                out.append(f"{where}:{line}: imports the compiled {target}; only {', '.join(EXT_USERS)} may")
            theirs = layer_of(target)
            if theirs is None or target == me:
                continue
            graph.setdefault(me, set()).add(target)
            if theirs[0] > mine[0]:
                out.append(f"{where}:{line}: {mine[1]} (floor {mine[0]}) imports {target}, "
                           f"{theirs[1]} (floor {theirs[0]})")
            elif theirs[0] == mine[0] and theirs[1] != mine[1]:
                out.append(f"{where}:{line}: {mine[1]} imports {target} of the sibling {theirs[1]}")
        for line, target, name in private_attributes(path, root):
            out.append(f"{where}:{line}: uses private name {name} of {target}")
    out.extend(f"import circle: {' -> '.join(c)}" for c in circles(graph))
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path around each strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_only_point_down():
    assert violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"rram/__init__.py": "", **files}.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, expected", [
    ({"rram/datapath/__init__.py": "", "rram/control/__init__.py": "", "rram/control/keeper.py": "",
      "rram/datapath/store.py": "def f():\n    from ..control.keeper import Keeper\n"},
     "rram/datapath/store.py:2: datapath imports rram.control.keeper of the sibling control"),
    ({"rram/transport/__init__.py": "", "rram/cluster.py": "",
      "rram/transport/tcp.py": "import os\nimport rram.cluster\n"},
     "rram/transport/tcp.py:2: transport (floor 1) imports rram.cluster, composition root (floor 3)"),
    ({"rram/transport/__init__.py": "", "rram/transport/tcp.py": "def _stats(): pass\n",
      "rram/transport/loopback.py": "from .tcp import _stats\n"},
     "rram/transport/loopback.py:1: takes private name _stats from rram.transport.tcp"),
    ({"rram/transport/__init__.py": "", "rram/transport/tcp.py": "",
      "rram/transport/loopback.py": "from . import tcp\nx = tcp._Stats\n"},
     "rram/transport/loopback.py:2: uses private name _Stats of rram.transport.tcp"),
    ({"rram/control/__init__.py": "", "rram/control/keeper.py": "from .._ext import _tcpwire\n"},
     "rram/control/keeper.py:1: imports the compiled rram._ext._tcpwire; only"),
    ({"rram/cli.py": "from .frontends import requester\n", "rram/frontends/__init__.py": "",
      "rram/frontends/requester.py": "def main():\n    from ..cli import main\n"},
     "rram/frontends/requester.py:2: frontends (floor 4) imports rram.cli, entry points (floor 6)"),
    ({"rram/odd.py": ""}, "rram/odd.py: module rram.odd has no floor"),
])
def test_the_check_names_file_and_line(tmp_path, files, expected):
    found = violations(_tree(tmp_path, files))
    assert any(v.startswith(expected) for v in found), found


def test_the_check_finds_circles(tmp_path):
    root = _tree(tmp_path, {"rram/datapath/__init__.py": "", "rram/datapath/store.py": "from . import remote\n",
                            "rram/datapath/remote.py": "def f():\n    from .store import PageStore\n"})
    assert violations(root) == ["import circle: rram.datapath.remote -> rram.datapath.store -> rram.datapath.remote"]


def test_package_face_hands_on_far_memory_lazily():
    import subprocess
    import sys

    code = ("import sys, rram; assert 'rram.frontends.farmem' not in sys.modules; "
            "from rram.frontends.farmem import FarMemory; assert rram.FarMemory is FarMemory")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
