"""The unit everything is counted in.  A module of its own so that any layer can import it
without importing the package face (rram/__init__.py), which sits on top."""
from __future__ import annotations

#: bytes in a page: what the store keeps, the NBD block size, the unit of slabs and arenas
PAGE_SIZE = 4096
