"""An on-path attacker on a tcp data connection, provider -> requester (tests only).

``FaultProxy`` forwards the bytes of a data connection; with a ``CompletionTamper`` as its
rewrite it re-frames the provider's stream (rram/transport/wire.py headers) and does to the
next COMPLETION what the armed ``TamperPlan`` says, once, as an attacker who can change
bytes in flight (but holds no key) would:

* ``flip-status``: toggle bits of the status field (a failed WRITE made to look done, or a
  done one made to look failed);
* ``replay``: send the previous COMPLETION of this connection again in place of this one;
* ``strip-mac``: drop the MAC trailer and clear FLAG_MAC (pass it off as an unsigned frame);
* ``truncate-mac``: drop the last 8 bytes of the MAC (the stream is then misframed).

Every frame passes whole, so a frame split across segments waits for its rest.
"""
from __future__ import annotations

import threading

from ..transport import wire

MODES = ("flip-status", "replay", "strip-mac", "truncate-mac")
_STATUS = 20  # offset of the status field in a header
_FLAGS = 6


class TamperPlan:
    """What the next COMPLETION on any connection of one proxy suffers (shared by its rewriters)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.mode: str | None = None
        self.done: list[str] = []  # modes applied so far, in order

    def arm(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown tamper mode {mode!r}; one of {MODES}")
        with self._lock:
            self.mode = mode

    def take(self, have_previous: bool) -> str | None:
        """The armed mode, disarmed, if it applies to this frame (replay needs an earlier one)."""
        with self._lock:
            mode = self.mode
            if mode is None or (mode == "replay" and not have_previous):
                return None
            self.mode = None
            self.done.append(mode)
            return mode


class CompletionTamper:
    """A FaultProxy rewrite for the provider -> requester direction of one data connection."""

    def __init__(self, plan: TamperPlan):
        self.plan = plan
        self.buf = bytearray()
        self.previous: bytes | None = None
        self.broken = False  # not a data stream we understand: pass bytes on untouched

    def __call__(self, data: bytes) -> bytes:
        if self.broken:
            return data
        self.buf += data
        out = bytearray()
        while len(self.buf) >= wire.HEADER.size:
            try:
                h = wire.parse_header(self.buf, 0, wire.TO_REQUESTER)
            except Exception:
                self.broken = True
                out += self.buf
                self.buf.clear()
                break
            n = wire.HEADER.size + h.body_len
            if len(self.buf) < n:
                break
            frame = bytes(self.buf[:n])
            del self.buf[:n]
            out += self._frame(h, frame) if h.type == wire.COMPLETION else frame
        return bytes(out)

    def _frame(self, h: wire.Header, frame: bytes) -> bytes:
        mode = self.plan.take(self.previous is not None)
        previous, self.previous = self.previous, frame
        if mode == "flip-status":
            out = bytearray(frame)
            out[_STATUS] ^= 0x0A  # 0 (success) <-> 10 (remote access error)
            return bytes(out)
        if mode == "replay":
            return previous
        if mode == "strip-mac" and h.flags & wire.FLAG_MAC:
            out = bytearray(frame[: -wire.MAC_TRAILER])
            out[_FLAGS] &= ~wire.FLAG_MAC & 0xFF
            return bytes(out)
        if mode == "truncate-mac":
            return frame[:-8]
        return frame
