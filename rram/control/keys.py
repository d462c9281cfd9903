"""`rram keys init|add`: the cluster's master key and one key file per identity.

    rram keys init --config cluster.yaml                         # the master key (providers only)
    rram keys add app1 --role requester --config cluster.yaml    # keys/app1.key, for app1 only
    rram keys add admin --role operator --config cluster.yaml

``init`` writes ``secret_file`` (0600) if it does not exist.  ``add`` derives NAME's key from
the master key (rram/control/auth.py) at the generation after the last revoked one and writes
``keys_dir/NAME.key`` (0600, never over an existing file); hand that file to NAME alone.
Providers need nothing new: they derive the same key when NAME connects.
"""
from __future__ import annotations

import os
import sys

import yaml

from .. import config as C
from .. import errors
from . import auth


def credential(cfg, name: str, role: str) -> auth.Credential:
    """``name``'s credential: its key file in ``keys_dir`` if there is one (the role is the
    file's), else derived as ``role`` from the master key where this host holds it."""
    path = cfg.key_path(name)
    if os.path.exists(path):
        return load(path)
    if cfg.secret is None and (cfg.secret_file is None or not os.path.exists(cfg.secret_file)):
        raise errors.ConfigError(f"{cfg.source}: no key for {name!r}: {path} does not exist and this host "
                                 f"has no master key (create one with `rram keys add {name} --role {role}`)")
    return auth.derive(cfg.secret_bytes(), name, role, cfg.revoked.get(name, 0) + 1)


# A key file: YAML {name, role, generation, key (hex)}, mode 0600.


def load(path) -> auth.Credential:
    """The Credential in key file ``path``; ConfigError naming the file and key otherwise."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise errors.ConfigError(f"{path}: cannot read key file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise errors.ConfigError(f"{path}: not valid YAML: {exc}") from exc
    fields = ("name", "role", "generation", "key")
    if not isinstance(data, dict):
        raise errors.ConfigError(f"{path}: expected a mapping with {', '.join(fields)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise errors.ConfigError(f"{path}: {unknown[0]}: unknown key; expected one of {', '.join(fields)}")
    missing = [k for k in fields if k not in data]
    if missing:
        raise errors.ConfigError(f"{path}: {missing[0]}: expected a value (this key is required)")
    try:
        auth.check_identity(data["name"], data["role"], data["generation"])
    except errors.ProtocolError as exc:
        raise errors.ConfigError(f"{path}: {exc}") from exc
    try:
        key = bytes.fromhex(data["key"])
    except (TypeError, ValueError):
        key = b""
    if len(key) != auth.KEY_SIZE:
        raise errors.ConfigError(f"{path}: key: expected {auth.KEY_SIZE} bytes in hex")
    return auth.Credential(data["name"], data["role"], data["generation"], key)


def write(path, cred: auth.Credential) -> None:
    """Write ``cred`` to a new file only its owner can read (never over an existing one)."""
    text = yaml.safe_dump({"name": cred.name, "role": cred.role, "generation": cred.generation,
                           "key": cred.key.hex()}, sort_keys=False)
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def init(cfg) -> str:
    if cfg.secret is not None:
        raise errors.ConfigError(f"{cfg.source}: the master key is inline (`secret`); use secret_file to "
                                 "keep it in a file only providers can read")
    if cfg.secret_file is None:
        raise errors.ConfigError(f"{cfg.source}: secret_file: expected the path for the master key")
    if os.path.exists(cfg.secret_file):
        raise errors.ConfigError(f"{cfg.secret_file} already exists; remove it first to start a new cluster "
                                 "(every key issued from it stops working)")
    fd = os.open(cfg.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth.new_master_key().hex() + "\n")
    return cfg.secret_file


def add(cfg, name: str, role: str, out: str | None = None) -> tuple[str, auth.Credential]:
    cred = auth.derive(cfg.secret_bytes(), name, role, cfg.revoked.get(name, 0) + 1)
    path = out or cfg.key_path(name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        write(path, cred)
    except FileExistsError:
        raise errors.ConfigError(f"{path} already exists; revoke {name!r} (cluster file `revoked`) to issue "
                                 "the next generation, or remove the file") from None
    return path, cred


def main(args) -> int:
    try:
        cfg = C.load(args.config)
        if args.keys_command == "init":
            print(f"rram keys: master key written to {init(cfg)}; give it to providers only")
        else:
            path, cred = add(cfg, args.name, args.role, args.out)
            print(f"rram keys: {cred.role} {cred.name!r} generation {cred.generation} -> {path}; "
                  f"give it to {cred.name} only")
    except (errors.RramError, OSError) as exc:
        print(f"rram keys: {exc}", file=sys.stderr)
        return 1
    return 0
