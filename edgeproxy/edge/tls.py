"""TLS for the https listener: nginx's defaults (TLS 1.2+, `HIGH:!aNULL:!MD5`), and the
negotiated protocol and cipher in each request's scope for $ssl_protocol / $ssl_cipher."""

from __future__ import annotations

import asyncio
import ssl

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
    for path in (tls.certificate, tls.key):
        if not path.is_file():
            raise TlsError(f"{path}: no such file (make one: edgeproxy certs self-signed)")
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except ssl.SSLError as exc:
        raise TlsError(
            f"{tls.certificate}, {tls.key}: not a usable certificate and key: {exc}"
        ) from exc
    return context


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding the TLS session's protocol and cipher to the scope."""

    _tls: tuple[str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            cipher = ssl_object.cipher()
            self._tls = (ssl_object.version() or "", cipher[0] if cipher else "")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope[SCOPE_KEY] = self._tls  # type: ignore[literal-required]
