"""TLS for the https listener: nginx's defaults (TLS 1.2+, `HIGH:!aNULL:!MD5`, ALPN http/1.1);
the negotiated protocol and cipher go in each request's scope (by `protocol.py`) for
$ssl_protocol/$ssl_cipher."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from edgeproxy.config import TlsConfig

CIPHERS = "HIGH:!aNULL:!MD5"  # nginx's ssl_ciphers default
# scope[SCOPE_KEY] = (protocol, cipher), e.g. ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
SCOPE_KEY = "edgeproxy.tls"


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The server's SSLContext; raises TlsError naming the file at fault."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(CIPHERS)
    # As nginx without http2: http/1.1 to a client that offers it, no ALPN to one that does not.
    context.set_alpn_protocols(["http/1.1"])
    for path in (tls.certificate, tls.key):
        if not path.is_file():
            raise TlsError(f"{path}: no such file (make one: edgeproxy certs self-signed)")
    try:
        context.load_cert_chain(tls.certificate, tls.key, password=_no_passphrase(tls))
    except ssl.SSLError as exc:
        raise TlsError(
            f"{tls.certificate}, {tls.key}: not a usable certificate and key: {exc}"
        ) from exc
    except OSError as exc:  # unreadable: a key only root may read, an I/O error
        raise TlsError(f"{tls.certificate}, {tls.key}: cannot read: {exc.strerror}") from exc
    return context


def _no_passphrase(tls: TlsConfig) -> Callable[[], bytes]:
    """What OpenSSL calls for an encrypted key's passphrase: there is none to give. Without
    it, OpenSSL asks on the terminal (a master reloading there would wait for an answer), or
    fails with EINVAL when there is none."""

    def refuse() -> bytes:
        raise TlsError(
            f"{tls.key}: the key is encrypted; give edgeproxy one without a passphrase "
            "(openssl pkey -in KEY -out PLAIN)"
        )

    return refuse


def session(transport: asyncio.Transport) -> tuple[str, str] | None:
    """(protocol, cipher) of a TLS connection, None for plain HTTP."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return (ssl_object.version() or "", cipher[0] if cipher else "")
