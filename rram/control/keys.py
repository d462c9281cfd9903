"""`rram keys init|add|tls`: the cluster's master key, one key file per identity, certificates.

    rram keys init --config cluster.yaml                         # master key; CA + provider certificates
    rram keys add app1 --role requester --config cluster.yaml    # keys/app1.key, for app1 only
    rram keys add admin --role operator --config cluster.yaml
    rram keys add mem3 --role provider --config cluster.yaml     # a new provider: tls_dir/mem3.pem + key
    rram keys tls app1 --server --out nbd-tls --config cluster.yaml   # the NBD export's certificate
    rram keys tls laptop --client --out laptop-tls --config cluster.yaml  # an NBD client's

``init`` writes ``secret_file`` (0600) if it does not exist.  ``add`` derives NAME's key from
the master key (rram/control/auth.py) at the generation after the last revoked one and writes
``keys_dir/NAME.key`` (0600, never over an existing file); hand that file to NAME alone.
Providers need nothing new: they derive the same key when NAME connects.

With ``tls_dir`` in the cluster file, ``init`` also makes the cluster's CA there (``ca.pem``,
and ``ca-key.pem``, 0600: keep it where certificates are issued) and a certificate for every
provider in the file that has none; ``add NODE --role provider`` makes one for a newcomer
(copy ``NODE.pem``, ``NODE-key.pem`` and ``ca.pem`` to it).  ``tls`` writes a directory in
GnuTLS's naming for the NBD export (``--server``) or one NBD client (``--client``): nbd-client,
qemu and libnbd read it as is.
"""
from __future__ import annotations

import os
import shutil
import sys

import yaml

from .. import config as C
from .. import errors
from .. import tls as T
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


def init(cfg) -> tuple[str | None, list[str]]:
    """The master key, and with tls_dir the CA and every provider's certificate that is missing:
    (the master key's file or None when it existed, the certificate files written).  A cluster
    that turns TLS on later runs init again: its master key stays."""
    if cfg.secret is not None:
        raise errors.ConfigError(f"{cfg.source}: the master key is inline (`secret`); use secret_file to "
                                 "keep it in a file only providers can read")
    if cfg.secret_file is None:
        raise errors.ConfigError(f"{cfg.source}: secret_file: expected the path for the master key")
    if os.path.exists(cfg.secret_file):
        certs = certificates(cfg)
        if certs:
            return None, certs
        raise errors.ConfigError(f"{cfg.secret_file} already exists; remove it first to start a new cluster "
                                 "(every key issued from it stops working)")
    fd = os.open(cfg.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(auth.new_master_key().hex() + "\n")
    return cfg.secret_file, certificates(cfg)


def certificates(cfg) -> list[str]:
    """The CA and the certificate of each provider that has none (nothing without tls_dir)."""
    if cfg.tls_dir is None:
        return []
    return T.make_cluster(cfg.tls_dir, cfg.name, [(n.name, n.address) for n in cfg.providers()])


def nbd_tls(cfg, name: str, out: str, *, client: bool, hosts=()) -> list[str]:
    """A directory in GnuTLS's naming for the NBD export (server) or an NBD client, signed by
    the cluster CA: ca-cert.pem and server-cert.pem/server-key.pem or client-cert.pem/client-key.pem."""
    if cfg.tls_dir is None:
        raise errors.ConfigError(f"{cfg.source}: tls_dir: expected the directory of the cluster CA "
                                 "(set it, then `rram keys init`)")
    os.makedirs(out, exist_ok=True)
    side = "client" if client else "server"
    written = T.issue_files(cfg.tls_dir, name, hosts, os.path.join(out, f"{side}-cert.pem"),
                            os.path.join(out, f"{side}-key.pem"), client=client)
    ca = os.path.join(out, "ca-cert.pem")
    if not os.path.exists(ca):
        shutil.copyfile(os.path.join(cfg.tls_dir, T.CA_CERT), ca)
        written.append(ca)
    return written


def add(cfg, name: str, role: str, out: str | None = None) -> tuple[str, auth.Credential]:
    cred = auth.derive(cfg.secret_bytes(), name, role, cfg.revoked.get(name, 0) + 1)
    if role == "provider" and cfg.tls_dir is not None:
        node = cfg.node(name)  # a provider's certificate names its address too
        cert, key = T.node_files(cfg.tls_dir, name)
        if not os.path.exists(cert):
            T.issue_files(cfg.tls_dir, name, [node.address], cert, key)
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
            secret, certs = init(cfg)
            if secret is not None:
                print(f"rram keys: master key written to {secret}; give it to providers only")
            if certs:
                print(f"rram keys: cluster CA and provider certificates in {cfg.tls_dir}: give each provider "
                      f"{T.CA_CERT}, NODE.pem and NODE-key.pem, everyone else {T.CA_CERT}; keep {T.CA_KEY} here")
            elif cfg.tls_dir is None:
                print("rram keys: no tls_dir in the cluster file: control connections stay plaintext")
        elif args.keys_command == "tls":
            written = nbd_tls(cfg, args.name, args.out, client=args.client, hosts=args.host or ())
            print(f"rram keys: {'client' if args.client else 'server'} certificate for {args.name!r} -> "
                  f"{', '.join(written)}")
        else:
            path, cred = add(cfg, args.name, args.role, args.out)
            print(f"rram keys: {cred.role} {cred.name!r} generation {cred.generation} -> {path}; "
                  f"give it to {cred.name} only")
    except (errors.RramError, OSError) as exc:
        print(f"rram keys: {exc}", file=sys.stderr)
        return 1
    return 0
