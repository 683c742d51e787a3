"""mTLS for every hop: a service serves TLS when given a certificate and key, and requires
client certificates signed by the CA when given one; the orchestrator presents the same files
as its client identity to the stages. Files come from a mounted Secret (the chart's tls.secret)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from diffmesh.runtime.config import ConfigError, ServerConfig


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes
    ca: bytes | None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=self.ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path} ({exc.strerror})") from exc


def load_tls(config: ServerConfig) -> TlsFiles | None:
    """The configured TLS material, or None for plaintext; a half-configured pair is an error."""
    if not (config.tls_cert_file or config.tls_key_file):
        if config.tls_ca_file:
            raise ConfigError("tls_ca_file: set without tls_cert_file and tls_key_file")
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        missing = "tls_key_file" if config.tls_cert_file else "tls_cert_file"
        raise ConfigError(f"{missing}: required when the other TLS file is set")
    return TlsFiles(cert=_read("tls_cert_file", config.tls_cert_file), key=_read("tls_key_file", config.tls_key_file),
                    ca=_read("tls_ca_file", config.tls_ca_file) if config.tls_ca_file else None)
