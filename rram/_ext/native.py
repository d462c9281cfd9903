"""The compiled extensions, one table: setup.py builds from it and ``rram.build_info`` reports it.

Plain data with no imports from rram, because setup.py loads this file before the package
(and its extensions) exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Native:
    name: str  # module name under rram._ext, built from ext/<name>.pyx
    library: str | None = None  # pkg-config name of the system library
    link: list[str] = field(default_factory=list)
    header: str | None = None
    why: str = ""
    optional: bool = True


NATIVE = (
    Native("_codec", "liblz4", ["lz4"], "lz4.h", "batch LZ4 page codec (fallback: python-lz4)"),
    Native("_slab", why="size-class slot allocator", optional=False),
    Native("_pagemap", why="compact page map", optional=False),
    Native("_regions", why="registered regions and the loopback transport's copies", optional=False),
    Native("_tcpwire", "libcrypto", ["crypto"], "openssl/hmac.h",
           "the tcp transport's data protocol (both ends; OpenSSL's HMAC signs its frames)", optional=False),
    Native("_seal", "libgcrypt", ["gcrypt"], "gcrypt.h",
           "sealed pages: AES-256-GCM over every image a provider stores (libgcrypt: less per page than OpenSSL 3.0's EVP)",
           optional=False),
    Native("_storepath", why="the page store's per-batch planning (get/put fast path)", optional=False),
    Native("_nbdwire", why="NBD request parsing and reply packing in batches", optional=False),
    # cimport _codec's C functions, so they need liblz4 too
    Native("_reqpath", "liblz4", ["lz4"], "lz4.h",
           "single requests on the store's tables, remote READs over tcp and verbs included, without the GIL"),
    Native("_nbdserve", "liblz4", ["lz4"], "lz4.h", "NBD requests, single and in runs, served through _reqpath in C"),
    Native("_uffd", why="userfaultfd for far-memory regions (rram.frontends.farmem)", optional=False),
    Native("_verbs", "libibverbs", ["ibverbs"], "infiniband/verbs.h", "RDMA verbs transport"),
)
