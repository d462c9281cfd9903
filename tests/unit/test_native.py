"""The extension table (rram/_ext/native.py) is what setup.py builds and build_info reports."""
from __future__ import annotations

import pathlib

import rram
from rram._ext.native import NATIVE

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_pyx_has_an_entry_and_build_info_reports_each():
    sources = {p.stem for p in (ROOT / "ext").glob("*.pyx")}
    assert sources == {nat.name for nat in NATIVE}
    info = rram.build_info()
    assert list(info) == [nat.name for nat in NATIVE]
    for nat in NATIVE:
        if not nat.optional:  # setup.py refuses to finish without these
            assert info[nat.name] == "built", (nat.name, info[nat.name])
