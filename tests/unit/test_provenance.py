"""C2PA provenance: the dev chain, signing PNG and JPEG, reading back (Valid / Trusted / Invalid /
NoManifest), what the manifest holds and what it must never hold."""
from __future__ import annotations

import datetime
import io
import json
import struct

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from PIL import Image

from diffmesh.devtools.dev_certs_c2pa import DOCUMENT_SIGNING, C2paDevChain, generate_c2pa_dev_chain
from services.safety.provenance import (GENERATION_LABEL, INVALID, NO_MANIFEST, TRAINED_ALGORITHMIC_MEDIA, TRUSTED,
                                        UNREADABLE, VALID, ProvenanceFacts, ProvenanceSigner, load_signer,
                                        read_manifest)

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
ALLOWED_GENERATION_KEYS = {"model_id", "policy_version", "request_id", "image", "watermark"}


@pytest.fixture(scope="module")
def dev_chain(tmp_path_factory: pytest.TempPathFactory) -> C2paDevChain:
    return generate_c2pa_dev_chain(tmp_path_factory.mktemp("c2pa"))


@pytest.fixture(scope="module")
def signer(dev_chain: C2paDevChain) -> ProvenanceSigner:
    return load_signer(dev_chain.chain_pem_path, dev_chain.key_path)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """A generated 320x256 image: gradients plus noise (compresses like a photo, not like a flat fill)."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:256, 0:320]
    base = np.stack([x * 255 / 319, y * 255 / 255, (x + y) * 255 / 574], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, mime: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, FORMATS[mime], **({"quality": 90} if mime == "image/jpeg" else {}))
    return buffer.getvalue()


def facts_for(request: dict, height: int = 256, width: int = 320) -> ProvenanceFacts:
    """What the safety stage records about a request: ids and sizes, never its prompt."""
    return ProvenanceFacts(model_id=request["model_id"], policy_version="policy-7", request_id=request["request_id"],
                           width=width, height=height, watermark_method="dwtDctSvd", watermark_bits=32,
                           watermark_payload="a1b2c3d4", watermarked=True)


REQUEST = {"request_id": "req-42", "model_id": "sdxl-base", "prompt": "a lighthouse painted by zyxwv quokka"}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def signed(request, signer, pixels) -> tuple[str, bytes, bytes]:
    mime = request.param
    original = encode(pixels, mime)
    return mime, original, signer.sign(original, mime, facts_for(REQUEST))


# --- the dev chain ----------------------------------------------------------------------------
def test_the_dev_chain_is_root_intermediate_signer_with_the_extensions_c2pa_needs(dev_chain):
    [root] = x509.load_pem_x509_certificates(dev_chain.root_pem_path.read_bytes())
    leaf, intermediate = x509.load_pem_x509_certificates(dev_chain.chain_pem_path.read_bytes())
    intermediate.verify_directly_issued_by(root)
    leaf.verify_directly_issued_by(intermediate)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        {ExtendedKeyUsageOID.EMAIL_PROTECTION, DOCUMENT_SIGNING}
    for cert, issuer in ((leaf, intermediate), (intermediate, root)):
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(days=364) < lifetime < datetime.timedelta(days=367)
    key = serialization.load_pem_private_key(dev_chain.key_path.read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()
    assert dev_chain.key_path.stat().st_mode & 0o077 == 0


def test_the_dev_chain_is_reused_when_valid_and_regenerated_when_not(tmp_path):
    first = generate_c2pa_dev_chain(tmp_path)
    contents = [path.read_bytes() for path in (first.root_pem_path, first.chain_pem_path, first.key_path)]
    again = generate_c2pa_dev_chain(tmp_path)
    assert [path.read_bytes() for path in (again.root_pem_path, again.chain_pem_path, again.key_path)] == contents
    # A key that is not the signing certificate's: the set is replaced by a fresh, consistent one.
    other = generate_c2pa_dev_chain(tmp_path / "other")
    first.key_path.write_bytes(other.key_path.read_bytes())
    renewed = generate_c2pa_dev_chain(tmp_path)
    assert renewed.chain_pem_path.read_bytes() != contents[1]
    leaf = x509.load_pem_x509_certificates(renewed.chain_pem_path.read_bytes())[0]
    assert serialization.load_pem_private_key(renewed.key_path.read_bytes(), None).public_key() == leaf.public_key()


# --- signing and reading back -----------------------------------------------------------------
def test_a_signed_file_reads_valid_but_untrusted_with_the_dev_chain(signed):
    mime, original, data = signed
    report = read_manifest(data, mime)
    assert report.state == VALID
    assert report.error_codes == ["signingCredential.untrusted"]
    assert report.facts == facts_for(REQUEST)


def test_a_signed_file_reads_trusted_with_the_dev_root_as_trust_anchor(signed, dev_chain):
    mime, _, data = signed
    report = read_manifest(data, mime, trust_anchors_pem=dev_chain.root_pem_path.read_bytes())
    assert report.state == TRUSTED and report.errors == []
    assert report.facts == facts_for(REQUEST)


def test_another_root_as_trust_anchor_does_not_make_it_trusted(signed, tmp_path):
    mime, _, data = signed
    stranger = generate_c2pa_dev_chain(tmp_path)
    report = read_manifest(data, mime, trust_anchors_pem=stranger.root_pem_path.read_bytes())
    assert report.state == VALID and "signingCredential.untrusted" in report.error_codes


def test_the_manifest_says_created_by_a_trained_algorithm(signed):
    mime, _, data = signed
    manifest = read_manifest(data, mime).active_manifest
    [actions] = [a["data"]["actions"] for a in manifest["assertions"] if a["label"] == "c2pa.actions.v2"]
    assert [(a["action"], a["digitalSourceType"], a["softwareAgent"]["name"]) for a in actions] == \
        [("c2pa.created", TRAINED_ALGORITHMIC_MEDIA, "diffmesh")]
    assert manifest["claim_generator_info"][0]["name"] == "diffmesh"


def test_the_manifest_holds_no_prompt_and_no_thumbnail(signed):
    mime, original, data = signed
    manifest = read_manifest(data, mime).active_manifest
    [generation] = [a["data"] for a in manifest["assertions"] if a["label"] == GENERATION_LABEL]
    assert set(generation) == ALLOWED_GENERATION_KEYS
    assert {a["label"] for a in manifest["assertions"]} == {"c2pa.actions.v2", GENERATION_LABEL}
    text = json.dumps(manifest)
    assert "thumbnail" not in text and b"c2pa.thumbnail" not in data
    for word in REQUEST["prompt"].split():
        if len(word) > 3:
            assert word not in text and word.encode() not in data
    assert len(data) - len(original) < 8_000        # the manifest alone: no pixel copy rides along


def test_signing_keeps_the_pixels(signed, pixels):
    """Signing adds the manifest and leaves the encoded image as it was: same decoded pixels."""
    mime, original, data = signed
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(decoded, np.asarray(Image.open(io.BytesIO(original)).convert("RGB")))
    if mime == "image/png":
        assert np.array_equal(decoded, pixels)


def _image_data_offset(data: bytes, mime: str) -> int:
    """An offset inside the pixel data (PNG: the first IDAT chunk; JPEG: the entropy-coded scan)."""
    if mime == "image/png":
        position = 8
        while position < len(data):
            length, kind = struct.unpack(">I4s", data[position:position + 8])
            if kind == b"IDAT":
                return position + 8 + length // 2
            position += 12 + length
        raise AssertionError("no IDAT chunk")
    scan = data.rindex(b"\xff\xda")              # the last start-of-scan: after every APP11 manifest segment
    offset = scan + (len(data) - scan) // 2
    while data[offset] in (0xFE, 0xFF, 0x00):    # keep clear of marker bytes and their stuffing
        offset += 1
    return offset


def test_one_flipped_byte_in_the_image_data_makes_it_invalid(signed):
    mime, _, data = signed
    damaged = bytearray(data)
    offset = _image_data_offset(data, mime)
    manifest_store = data.index(b"c2pa")
    assert offset > manifest_store + 4_000         # the flip is in the pixels, past the manifest
    damaged[offset] ^= 0x01
    report = read_manifest(bytes(damaged), mime)
    assert report.state == INVALID
    assert "assertion.dataHash.mismatch" in report.error_codes
    assert report.facts is None


def test_a_re_encoded_image_has_no_manifest_and_says_so(signed):
    mime, _, data = signed
    reencoded = encode(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), mime)
    report = read_manifest(reencoded, mime)
    assert (report.state, report.active_manifest, report.facts, report.errors) == (NO_MANIFEST, None, None, [])


def test_bytes_that_are_no_image_are_reported_unreadable():
    report = read_manifest(b"not an image at all", "image/png")
    assert report.state == UNREADABLE and report.errors and report.facts is None


# --- refusals ---------------------------------------------------------------------------------
def test_formats_without_an_embedded_manifest_are_refused(signer, pixels):
    with pytest.raises(ValueError, match="image/webp"):
        signer.sign(b"RIFF....WEBP", "image/webp", facts_for(REQUEST))


def test_a_key_that_is_not_the_certificates_is_refused_at_construction(dev_chain, tmp_path):
    other = generate_c2pa_dev_chain(tmp_path)
    with pytest.raises(ValueError, match="not the key"):
        ProvenanceSigner(dev_chain.chain_pem_path.read_bytes(), other.key_path.read_bytes())
    with pytest.raises(ValueError, match="unreadable"):
        ProvenanceSigner(b"no certificate here", dev_chain.key_path.read_bytes())


def test_an_unknown_algorithm_is_refused(dev_chain):
    with pytest.raises(ValueError, match="algorithm"):
        ProvenanceSigner(dev_chain.chain_pem_path.read_bytes(), dev_chain.key_path.read_bytes(), algorithm="rsa")
