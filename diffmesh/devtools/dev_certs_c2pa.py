"""A development C2PA signing chain: P-256 root CA → intermediate CA → signing certificate.

For development and tests only: readers report manifests signed with it as untrusted
(`signingCredential.untrusted`) unless the generated root is given to them as a trust anchor.
Production mounts a chain issued by a CA on the C2PA trust list.

Why this shape: the C2PA SDK rejects a single self-signed certificate and a serverAuth-only EKU;
it accepts an end-entity certificate with CA:FALSE, KeyUsage digitalSignature and the
emailProtection + documentSigning EKUs, issued by an intermediate, with key identifiers on every
certificate. The chain PEM handed to the signer holds the signing certificate then the
intermediate (the root stays out: a verifier must already hold it).

(The mTLS test certificates are made by an openssl script inside tests/component/test_tls.py;
there were no `cryptography` helpers to share, so the ones here are self-contained.)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_FILE = "c2pa-dev-root.pem"
CHAIN_FILE = "c2pa-dev-chain.pem"          # signing certificate + intermediate
KEY_FILE = "c2pa-dev-signer.key"           # the signing certificate's private key (PKCS#8 PEM)

DOCUMENT_SIGNING = x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")   # id-kp-documentSigning (RFC 9336)
VALIDITY = datetime.timedelta(days=365)
# Regenerate when less than this is left, so a long-running dev stage never signs with a chain
# that expires under it.
RENEW_BEFORE = datetime.timedelta(days=7)
CLOCK_SKEW = datetime.timedelta(minutes=5)
ORGANIZATION = "diffmesh development"


@dataclass(frozen=True)
class C2paDevChain:
    root_pem_path: Path        # trust anchor for readers that should report "Trusted"
    chain_pem_path: Path       # signing certificate followed by the intermediate
    key_path: Path             # the signing certificate's private key


def generate_c2pa_dev_chain(directory: Path) -> C2paDevChain:
    """The dev chain in `directory`: the files already there when they form a valid chain that is
    not about to expire, else a freshly generated one (written with the key readable by the owner
    only)."""
    directory = Path(directory)
    chain = C2paDevChain(directory / ROOT_FILE, directory / CHAIN_FILE, directory / KEY_FILE)
    if _existing_chain_is_usable(chain):
        return chain
    directory.mkdir(parents=True, exist_ok=True)
    root_pem, chain_pem, key_pem = _new_chain_pems()
    # Key first, chain last: a reader that sees the chain file also sees a matching key
    # (and a half-written set fails validation and is regenerated next time).
    _write_atomically(chain.key_path, key_pem, mode=0o600)
    _write_atomically(chain.root_pem_path, root_pem, mode=0o644)
    _write_atomically(chain.chain_pem_path, chain_pem, mode=0o644)
    return chain


# --- generation ------------------------------------------------------------------------------
def _new_chain_pems() -> tuple[bytes, bytes, bytes]:
    now = datetime.datetime.now(datetime.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    signer_key = ec.generate_private_key(ec.SECP256R1())

    root_name = _name("diffmesh dev C2PA root CA")
    root = (_builder(root_name, root_name, root_key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, hashes.SHA256()))

    intermediate_name = _name("diffmesh dev C2PA intermediate CA")
    intermediate = (_builder(intermediate_name, root_name, intermediate_key.public_key(), now)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(_ca_key_usage(), critical=True)
                    .add_extension(_authority_key_id(root), critical=False)
                    .sign(root_key, hashes.SHA256()))

    signer = (_builder(_name("diffmesh dev C2PA signer"), intermediate_name, signer_key.public_key(), now)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                           key_encipherment=False, data_encipherment=False,
                                           key_agreement=False, key_cert_sign=False, crl_sign=False,
                                           encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION, DOCUMENT_SIGNING]),
                             critical=False)
              .add_extension(_authority_key_id(intermediate), critical=False)
              .sign(intermediate_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    key_pem = signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return root.public_bytes(pem), signer.public_bytes(pem) + intermediate.public_bytes(pem), key_pem


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: datetime.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- reuse -----------------------------------------------------------------------------------
def _existing_chain_is_usable(chain: C2paDevChain) -> bool:
    """True when the three files exist and form root → intermediate → signer, the key is the
    signer's, and no certificate expires within RENEW_BEFORE."""
    try:
        [root] = x509.load_pem_x509_certificates(chain.root_pem_path.read_bytes())
        signer, intermediate = x509.load_pem_x509_certificates(chain.chain_pem_path.read_bytes())
        key = serialization.load_pem_private_key(chain.key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return False
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != signer.public_key():
        return False
    deadline = datetime.datetime.now(datetime.timezone.utc) + RENEW_BEFORE
    if any(cert.not_valid_after_utc < deadline for cert in (root, intermediate, signer)):
        return False
    try:
        root.verify_directly_issued_by(root)
        intermediate.verify_directly_issued_by(root)
        signer.verify_directly_issued_by(intermediate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
