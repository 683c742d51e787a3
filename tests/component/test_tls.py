"""mTLS on every hop: stages serve TLS and require client certificates signed by the CA; the
orchestrator presents its own certificate to them; plaintext and certificate-less callers are
refused."""
from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from diffmesh.client import MeshClient, build_request, wait_for_serving
from diffmesh.mesh import LocalMesh, free_port, free_ports
from diffmesh.stages import STAGES
from diffmesh.runtime.config import ServerConfig
from diffmesh.runtime.tls import load_tls

_OPENSSL = """
set -e
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj "/CN=diffmesh-test-ca"
for name in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout $name.key -out $name.csr -subj "/CN=$name"
  printf "subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth,clientAuth\\n" > $name.ext
  openssl x509 -req -in $name.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $name.pem -days 2 -extfile $name.ext
done
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["bash", "-c", _OPENSSL], cwd=folder, check=True, capture_output=True)
    return folder


def credentials(certs: Path, with_client_cert: bool = True) -> grpc.ChannelCredentials:
    if not with_client_cert:
        return grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes())
    return grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(),
                                        private_key=(certs / "client.key").read_bytes(),
                                        certificate_chain=(certs / "client.pem").read_bytes())


@pytest.fixture(scope="module")
def tls_mesh(certs, registry, tmp_path_factory):
    tls = ["--tls-cert-file", str(certs / "server.pem"), "--tls-key-file", str(certs / "server.key"),
           "--tls-ca-file", str(certs / "ca.pem")]
    health_port = free_port()
    backend = tls + ["--models", "tiny-sd15"]
    mesh = LocalMesh(registry=registry, workdir=tmp_path_factory.mktemp("tls"), ports=free_ports(),
                     extra_args={**{spec.name: backend for spec in STAGES.backends()},
                                 "face": tls + ["--models", "faces"],  # the face stage loads face packs
                                 STAGES.frontend().name: tls})
    mesh.extra_args["denoiser"] = backend + ["--health-port", str(health_port)]
    mesh.start()
    try:
        for name in mesh.processes:
            wait_for_serving(mesh.address(name), 120, credentials=credentials(certs))
        yield {**{name: mesh.address(name) for name in mesh.processes},
               "denoiser-health": f"127.0.0.1:{health_port}"}
    finally:
        assert all(code == 0 for code in mesh.stop().values())


def test_a_request_crosses_every_hop_over_mtls(certs, tls_mesh):
    with MeshClient(tls_mesh["orchestrator"], credentials=credentials(certs)) as client:
        response = client.generate(build_request("a cat", model="tiny-sd15", width=64, height=64, steps=2, seed=1),
                                   timeout=60)
    assert response.images[0].image.data.startswith(b"\x89PNG")


@pytest.mark.parametrize("stage", ["orchestrator", "denoiser"])
def test_plaintext_and_certificate_less_callers_are_refused(certs, tls_mesh, stage):
    request = health_pb2.HealthCheckRequest()
    for channel in (grpc.insecure_channel(tls_mesh[stage]),
                    grpc.secure_channel(tls_mesh[stage], credentials(certs, with_client_cert=False))):
        with channel, pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_serves_probes_in_plaintext_and_nothing_else(tls_mesh):
    from diffmesh.proto.v1 import denoiser_pb2, denoiser_pb2_grpc

    with grpc.insecure_channel(tls_mesh["denoiser-health"]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            list(denoiser_pb2_grpc.DenoiserStub(channel).Denoise(denoiser_pb2.DenoiseRequest(), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Bytes that are not a HealthCheckRequest: INVALID_ARGUMENT, as on the main port.
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary("/grpc.health.v1.Health/Check")(b"\x0a\x7fshort", timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "grpc.health.v1.HealthCheckRequest" in info.value.details()


def test_tls_settings_are_checked(tmp_path):
    with pytest.raises(Exception, match="tls_key_file: required"):
        load_tls(ServerConfig(tls_cert_file=str(tmp_path / "x.pem")))
    with pytest.raises(Exception, match="tls_ca_file: set without"):
        load_tls(ServerConfig(tls_ca_file=str(tmp_path / "ca.pem")))
    with pytest.raises(Exception, match="tls_cert_file: cannot read"):
        load_tls(ServerConfig(tls_cert_file=str(tmp_path / "none.pem"), tls_key_file=str(tmp_path / "none.key")))
