"""Control protocol frames, sans-IO: bytes in, checked messages out.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON, one object, at most
``MAX_FRAME`` bytes.  Requests carry ``{"v": 1, "type": ..., "id": n, ...fields}``; replies
``{"v": 1, "re": n, "ok": true, ...fields}`` or ``{"v": 1, "re": n, "ok": false, "error":
{"code": ..., "message": ...}}``.  Field names and types of every request come from
``REQUESTS``; a reply's fields depend on the request it answers, so the requester checks them
with ``check_reply(request_type, msg)``.

Session set-up (see auth.py): ``hello`` -> challenge, ``auth`` -> welcome; then any other request.
"""
from __future__ import annotations

import json
import struct

from ..errors import ProtocolError

VERSION = 1
MAX_FRAME = 1 << 20
#: what a provider accepts from a peer that has not authenticated yet (hello, auth are < 1 KiB)
MAX_HANDSHAKE_FRAME = 4 << 10
#: what a provider accepts in one request afterwards (requests are small; replies may be larger)
MAX_REQUEST_FRAME = 64 << 10
LENGTH = struct.Struct(">I")

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_DICT = (dict,)
_LIST = (list,)
_BOOL = (bool,)

#: request type -> {field: allowed types}; every field is required, no others are allowed
REQUESTS: dict[str, dict[str, tuple]] = {
    "hello": {"requester": _STR, "role": _STR, "generation": _INT, "nonce": _STR},
    "auth": {"mac": _STR},
    "alloc_slab": {"size": _INT},
    "free_slab": {"lease": _INT},
    "connect": {"params": _DICT},
    "stats": {},
    "heartbeat": {},
    "resume": {"session": _STR, "token": _STR},
    "drain": {},
    "reclaim": {"bytes": _INT},
    "report": {"degraded": _INT},
    "undrain": {},
    "shutdown": {},
    "reload": {},
    "bye": {},
}

#: request type -> fields of its successful reply (extra fields are allowed: newer providers)
REPLIES: dict[str, dict[str, tuple]] = {
    "hello": {"challenge": _STR},
    "auth": {"node": _STR, "incarnation": _INT, "transport": _STR, "capacity": _INT, "session": _STR,
             "token": _STR, "proof": _STR},
    "alloc_slab": {"lease": _INT, "addr": _INT, "length": _INT, "rkey": _INT},
    "free_slab": {"freed": _INT},
    "connect": {"params": _DICT},
    "stats": {"stats": _DICT},
    "heartbeat": {"incarnation": _INT, "capacity": _INT, "free": _INT, "load": _NUM, "state": _STR},
    "resume": {"session": _STR, "token": _STR, "leases": _LIST},
    "drain": {"state": _STR},
    "reclaim": {"capacity": _INT, "excess": _INT},
    "report": {},
    "undrain": {"state": _STR},
    "shutdown": {"state": _STR},
    "reload": {"cut": _INT},
    "bye": {"released": _INT},
}

#: error codes a provider sends, and what they mean
ERROR_CODES = {
    "bad_request": "the frame or a field did not follow the protocol",
    "auth": "authentication failed",
    "forbidden": "the caller's role may not make this request",
    "state": "the request is not allowed in this state of the connection",
    "capacity": "the provider cannot lease that much without exceeding its capacity",
    "draining": "the provider is draining and leases nothing new",
    "not_found": "no such lease or session",
    "transport": "the data transport failed",
    "shutdown": "the provider is shutting down",
    "limit": "a per-requester cap of the provider (limits in the cluster file) is reached",
    "internal": "the provider hit an unexpected error",
}

_ENVELOPE_REQUEST = {"v", "type", "id"}
_ENVELOPE_REPLY = {"v", "re", "ok", "error"}


def _type_names(types: tuple) -> str:
    return " or ".join({int: "integer", float: "number", str: "string", dict: "object", list: "array",
                        bool: "boolean"}[t] for t in types)


def _is(value, types: tuple) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not an integer here
    return isinstance(value, types)


def _id(msg: dict, key: str, what: str) -> int:
    if key not in msg:
        raise ProtocolError(f"{what} has no {key!r} field")
    value = msg[key]
    if not _is(value, _INT) or value < 0:
        raise ProtocolError(f"{what} field {key!r} must be a non-negative integer, got {value!r}")
    return value


def _fields(msg: dict, schema: dict, envelope: set, what: str, *, extra_ok: bool) -> None:
    for name, types in schema.items():
        if name not in msg:
            raise ProtocolError(f"{what} is missing field {name!r}")
        if not _is(msg[name], types):
            raise ProtocolError(f"{what} field {name!r} must be {_type_names(types)}, got {msg[name]!r}")
    if not extra_ok:
        unknown = sorted(k for k in msg if k not in schema and k not in envelope)
        if unknown:
            raise ProtocolError(f"{what} has unknown field {unknown[0]!r}")


def check_version(msg: dict) -> None:
    if "v" not in msg:
        raise ProtocolError("message has no protocol version field 'v'")
    if msg["v"] != VERSION or isinstance(msg["v"], bool):
        raise ProtocolError(f"unsupported protocol version {msg['v']!r}; this side speaks version {VERSION}")


def check_request(msg: dict) -> dict:
    """``msg`` if it is a well-formed request, else ProtocolError saying what is wrong."""
    check_version(msg)
    _id(msg, "id", "request")
    if "type" not in msg:
        raise ProtocolError("request has no 'type' field")
    kind = msg["type"]
    if not isinstance(kind, str):
        raise ProtocolError(f"request field 'type' must be a string, got {kind!r}")
    schema = REQUESTS.get(kind)
    if schema is None:
        raise ProtocolError(f"unknown request type {kind!r}; expected one of {', '.join(REQUESTS)}")
    _fields(msg, schema, _ENVELOPE_REQUEST, f"{kind} request", extra_ok=False)
    return msg


def check_reply_envelope(msg: dict) -> dict:
    check_version(msg)
    _id(msg, "re", "reply")
    ok = msg.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError(f"reply field 'ok' must be true or false, got {ok!r}")
    if not ok:
        err = msg.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str) or not isinstance(
                err.get("message"), str):
            raise ProtocolError(f"error reply needs error: {{code: string, message: string}}, got {err!r}")
    return msg


def check_reply(request_type: str, msg: dict) -> dict:
    """Check the fields of a successful reply to ``request_type``."""
    _fields(msg, REPLIES[request_type], _ENVELOPE_REPLY, f"{request_type} reply", extra_ok=True)
    return msg


def request(kind: str, msg_id: int, **fields) -> dict:
    return check_request({"v": VERSION, "type": kind, "id": msg_id, **fields})


def reply(msg_id: int, **fields) -> dict:
    return {"v": VERSION, "re": msg_id, "ok": True, **fields}


def error_reply(msg_id: int, code: str, message: str) -> dict:
    return {"v": VERSION, "re": msg_id, "ok": False, "error": {"code": code, "message": message}}


def encode(msg: dict) -> bytes:
    """One frame for ``msg`` (a JSON-serialisable dict)."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"a message must be a dict, got {type(msg).__name__}")
    try:
        body = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"message cannot be encoded as JSON: {exc}") from exc
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return LENGTH.pack(len(body)) + body


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class Decoder:
    """Cut a byte stream into checked messages.

    ``role`` is "request" (the provider's side: full schema check), "reply" (the requester's
    side: envelope check; ``check_reply`` does the fields) or "any" (JSON objects with a valid
    version only).  After a ProtocolError the stream cannot be trusted: drop the connection.
    """

    def __init__(self, role: str = "request", max_frame: int = MAX_FRAME):
        if role not in ("request", "reply", "any"):
            raise ValueError(f"role must be request, reply or any, got {role!r}")
        self.role = role
        self.max_frame = max_frame
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= LENGTH.size:
            (n,) = LENGTH.unpack_from(self._buf)
            if n > self.max_frame:
                raise ProtocolError(f"frame length {n} exceeds the {self.max_frame}-byte limit")
            if len(self._buf) < LENGTH.size + n:
                break
            body = bytes(self._buf[LENGTH.size : LENGTH.size + n])
            del self._buf[: LENGTH.size + n]
            out.append(self._message(body))
        return out

    def _message(self, body: bytes) -> dict:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"frame is not valid UTF-8: {exc}") from exc
        try:
            msg = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:  # JSONDecodeError, and huge-number conversions
            raise ProtocolError(f"frame is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise ProtocolError("frame JSON is nested too deeply") from exc
        if not isinstance(msg, dict):
            raise ProtocolError(f"a message must be a JSON object, got {type(msg).__name__}")
        if self.role == "request":
            return check_request(msg)
        if self.role == "reply":
            return check_reply_envelope(msg)
        check_version(msg)
        return msg
