"""Far memory for Python: ``FarMemory``, a region whose pages live in rram (userfaultfd).

region.py   the application's side: memfd, userfaultfd, watchdog, the public class
handler.py  the fault handler process (``python -m rram.frontends.farmem.handler``)
prefetch.py Leap's majority-trend predictor
wire.py     the control channel between the two (JSON lines, fds by SCM_RIGHTS)
"""
from __future__ import annotations

from .region import FarMemory, kernel_support

__all__ = ["FarMemory", "kernel_support"]
