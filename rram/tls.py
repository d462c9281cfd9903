"""TLS 1.3 for control connections and the NBD export: contexts, a handshake under one deadline,
and the cluster's certificate authority (what ``rram keys`` writes).

The cluster file's ``tls_dir`` (relative to the file) holds::

    ca.pem                   the cluster CA's certificate: every node has it; clients verify providers with it
    ca-key.pem               the CA's private key: only where certificates are issued (``rram keys``)
    NODE.pem, NODE-key.pem   provider NODE's certificate (names: NODE and its address) and private key

Clients check a provider's certificate against ``ca.pem`` and the node's *name* (not its
address), so a machine that takes over an address cannot pose as the provider.  TLS proves
the provider and encrypts; requesters and operators still prove who they are with their
identity keys (rram/control/auth.py), inside the channel.

NBD export directories use GnuTLS's names (what nbd-client, qemu and libnbd read):
``ca-cert.pem``, ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import select
import socket
import ssl
import time

from .errors import AuthError, ConfigError, ConnectionLost, ProtocolError

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
#: days a certificate is valid: a CA outlives the node certificates it issues
CA_DAYS = 3650
CERT_DAYS = 825


# -- contexts -------------------------------------------------------------------------------------


def server_context(cert: str, key: str, client_ca: str | None = None, *,
                   minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    """A server context, TLS 1.3 only unless ``minimum`` says otherwise; with ``client_ca`` clients
    must show a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    # no session tickets: nobody resumes (a control connection lives long, an NBD one too), and
    # TLS 1.3 sends them after the handshake, as more small writes in the peer's way
    ctx.num_tickets = 0
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only client context that trusts ``ca`` alone and checks the server's name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    _load_ca(ctx, ca)
    if cert is not None:
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str | None) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS: {exc.filename or cert}: no such file (create it with `rram keys`)") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load certificate {cert} with key {key}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca)
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS: {ca}: no such file (the cluster CA: `rram keys init`)") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS: cannot load CA certificate {ca}: {exc}") from exc


def cluster_client_context(cfg) -> ssl.SSLContext | None:
    """What a requester or operator dials providers with: None when the cluster has no tls_dir."""
    if cfg.tls_dir is None:
        return None
    return client_context(os.path.join(cfg.tls_dir, CA_CERT))


def provider_context(cfg, node_name: str) -> ssl.SSLContext | None:
    """Provider ``node_name``'s server context: None when the cluster has no tls_dir."""
    if cfg.tls_dir is None:
        return None
    return server_context(*node_files(cfg.tls_dir, node_name))


def node_files(tls_dir: str, name: str) -> tuple[str, str]:
    return os.path.join(tls_dir, f"{name}.pem"), os.path.join(tls_dir, f"{name}-key.pem")


# -- the handshake ---------------------------------------------------------------------------------


def handshake(tls_sock: ssl.SSLSocket, deadline: float) -> None:
    """Finish ``tls_sock``'s handshake by ``deadline`` (time.monotonic()), whatever the peer drips:
    Python's own do_handshake applies the socket timeout to each wait, not to the whole.

    AuthError: the peer's certificate is not valid for it; ProtocolError: the peer does not speak
    TLS 1.3 (plaintext, garbage) or is too slow; ConnectionLost: the connection broke.
    The socket is left blocking with no timeout; the caller sets its own."""
    tls_sock.setblocking(False)
    try:
        while True:
            try:
                tls_sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                want = ((tls_sock,), (), ())
            except ssl.SSLWantWriteError:
                want = ((), (tls_sock,), ())
            left = deadline - time.monotonic()
            if left <= 0 or not any(select.select(*want, left)):
                raise ProtocolError("TLS handshake not finished in time")
    except ssl.SSLCertVerificationError as exc:
        raise AuthError(f"TLS: certificate not accepted: {exc.verify_message or exc.reason}") from None
    except ssl.SSLError as exc:
        raise ProtocolError(f"TLS handshake failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise ConnectionLost(f"TLS handshake failed: {exc.strerror or exc}") from None
    finally:
        if tls_sock.fileno() >= 0:
            tls_sock.setblocking(True)


def accept(ctx: ssl.SSLContext, sock: socket.socket, deadline: float) -> ssl.SSLSocket:
    """Server side of TLS on an accepted ``sock`` (which it takes over), by ``deadline``."""
    tls_sock = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        handshake(tls_sock, deadline)
    except BaseException:
        tls_sock.close()
        raise
    return tls_sock


def shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut the TCP connection under ``sock`` from any thread.  SSLSocket.shutdown also drops its
    TLS state, under a reader that may be blocked in it: this leaves the TLS state alone."""
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def peer_name(tls_sock) -> str | None:
    """The common name of the peer's verified certificate, if it showed one."""
    cert = tls_sock.getpeercert() if isinstance(tls_sock, ssl.SSLSocket) else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


# -- the certificate authority ---------------------------------------------------------------------


def new_ca(cluster: str) -> tuple[bytes, bytes]:
    """A new CA for ``cluster``: (certificate PEM, private key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"rram cluster {cluster} CA")])
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    builder = (_builder(name, name, key.public_key(), CA_DAYS)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(usage, critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return _pem(builder, key, key)


def issue(ca_cert: bytes, ca_key: bytes, name: str, hosts=(), *, client: bool = False) -> tuple[bytes, bytes]:
    """A certificate for ``name`` signed by the CA: (certificate PEM, private key PEM).

    A server certificate names ``name`` and each of ``hosts`` (DNS names or IP addresses);
    ``client`` makes one that proves ``name`` to a server (NBD clients)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    # GnuTLS (qemu, libnbd, nbd-client) wants digitalSignature and keyEncipherment when the
    # extension is critical; not critical, OpenSSL and GnuTLS both take it for an EC key
    usage = x509.KeyUsage(digital_signature=True, key_encipherment=True, key_cert_sign=False, crl_sign=False,
                          content_commitment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False)
    purpose = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (_builder(subject, ca.subject, key.public_key(), CERT_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(usage, critical=False)
               .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                              critical=False))
    if not client:
        builder = builder.add_extension(x509.SubjectAlternativeName(_names([name, *hosts])), critical=False)
    return _pem(builder, signer, key)


def _names(hosts):
    from cryptography import x509

    out, seen = [], set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _builder(subject, issuer, public_key, days: int):
    from cryptography import x509

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind still accept it
            .not_valid_after(now + datetime.timedelta(days=days)))


def _pem(builder, signer, key) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import hashes, serialization

    cert = builder.sign(signer, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_private(path: str, data: bytes) -> None:
    """A new file only its owner can read; never over an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_cluster(tls_dir: str, cluster: str, providers) -> list[str]:
    """The CA (unless ``tls_dir`` has one) and a certificate for each (name, address) in
    ``providers`` that has none yet; the files written."""
    os.makedirs(tls_dir, exist_ok=True)
    written = []
    ca_path, ca_key_path = os.path.join(tls_dir, CA_CERT), os.path.join(tls_dir, CA_KEY)
    if not os.path.exists(ca_path):
        if os.path.exists(ca_key_path):
            raise ConfigError(f"{ca_key_path} exists without {ca_path}; remove it to make a new CA")
        cert, key = new_ca(cluster)
        write_private(ca_key_path, key)
        write_public(ca_path, cert)
        written += [ca_path, ca_key_path]
    for name, address in providers:
        cert_path, key_path = node_files(tls_dir, name)
        if not os.path.exists(cert_path):
            written += issue_files(tls_dir, name, [address], cert_path, key_path)
    return written


def issue_files(tls_dir: str, name: str, hosts, cert_path: str, key_path: str, *, client: bool = False) -> list[str]:
    """Sign a certificate for ``name`` with ``tls_dir``'s CA into ``cert_path``/``key_path``."""
    ca_path, ca_key_path = os.path.join(tls_dir, CA_CERT), os.path.join(tls_dir, CA_KEY)
    try:
        with open(ca_path, "rb") as f:
            ca_cert = f.read()
        with open(ca_key_path, "rb") as f:
            ca_key = f.read()
    except OSError as exc:
        raise ConfigError(f"TLS: cannot read the cluster CA ({exc.filename}: {exc.strerror}); "
                          "certificates are issued where `rram keys init` made it") from exc
    cert, key = issue(ca_cert, ca_key, name, hosts, client=client)
    for path in (cert_path, key_path):
        if os.path.exists(path):
            raise ConfigError(f"{path} already exists; remove it to issue a new one")
    write_private(key_path, key)
    write_public(cert_path, cert)
    return [cert_path, key_path]
