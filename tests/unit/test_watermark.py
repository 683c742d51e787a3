"""The invisible watermark: payloads, the small-image rule, survival through JPEG and resizes on
real photographs, the false-positive rate on unmarked images, and cost for both methods."""
from __future__ import annotations

import hashlib
import time

import cv2
import numpy as np
import pytest
import skimage.data
from imwatermark import WatermarkDecoder

from services.safety.watermark import (SMALL_IMAGE_REASON, Watermarker, default_threshold,
                                       false_positive_probability, payload_for)

PHOTOS = ("astronaut", "coffee", "chelsea")


def photo(name: str, size: int = 512) -> np.ndarray:
    return cv2.resize(getattr(skimage.data, name)()[..., :3], (size, size), interpolation=cv2.INTER_AREA)


def jpeg(image: np.ndarray, quality: int = 80) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def shrink(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape[:2]
    return cv2.resize(image, (round(width * factor), round(height * factor)), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def dwt() -> Watermarker:
    return Watermarker("dwtDctSvd", 32)


# --- payload and threshold --------------------------------------------------------------------
def test_the_payload_is_the_first_bits_of_sha256_of_the_request_id():
    assert payload_for("req-1") == hashlib.sha256(b"req-1").digest()[:4]
    assert payload_for("req-1", 64) == hashlib.sha256(b"req-1").digest()[:8]
    assert payload_for("req-1") != payload_for("req-2")
    assert Watermarker().payload_for("req-1") == payload_for("req-1")


def test_the_default_threshold_is_29_of_32_with_the_binomial_tail_as_false_positive_rate():
    assert default_threshold(32) == 29
    assert false_positive_probability(29, 32) == (4960 + 496 + 32 + 1) / 2 ** 32     # ~1.28e-6
    assert false_positive_probability(28, 32) > 2e-6 > false_positive_probability(29, 32)
    assert default_threshold(8) == 8                                                # cannot reach the target
    assert Watermarker(threshold=30).threshold == 30


@pytest.mark.parametrize("kwargs", [{"method": "dwtDct"}, {"bits": 12}, {"method": "rivaGan", "bits": 48},
                                    {"threshold": 33}, {"threshold": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Watermarker(**kwargs)


# --- embedding --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(255, 512, 3), (512, 200, 3), (64, 64, 3)])
def test_images_with_a_side_under_256_are_returned_unmarked_with_the_reason(dwt, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    result = dwt.embed(image, dwt.payload_for("r"))
    assert (result.marked, result.reason) == (False, SMALL_IMAGE_REASON)
    assert np.array_equal(result.image, image)
    check = dwt.verify(image, dwt.payload_for("r"))
    assert (check.present, check.matching_bits) == (False, 0)


def test_embedding_keeps_the_photo_in_rgb_order_and_nearly_unchanged(dwt):
    image = photo("astronaut")
    result = dwt.embed(image, dwt.payload_for("r"))
    assert result.marked and result.reason == "" and result.image.dtype == np.uint8
    assert result.image.shape == image.shape
    assert cv2.PSNR(image, result.image) > 35        # a red/blue swap of this photo scores 12.5 dB
    assert not np.array_equal(result.image, image)


def test_the_mark_is_where_the_library_looks_in_a_bgr_image(dwt):
    """Interoperability: any imwatermark decoder given the image the cv2 way (BGR) reads the payload,
    so the mark went into the library's U channel, not one made from swapped channels."""
    payload = dwt.payload_for("r")
    marked = dwt.embed(photo("coffee"), payload).image
    bits = WatermarkDecoder("bits", 32).decode(cv2.cvtColor(marked, cv2.COLOR_RGB2BGR), "dwtDctSvd")
    assert np.array_equal(np.asarray(bits, dtype=np.uint8), np.unpackbits(np.frombuffer(payload, np.uint8)))


def test_bad_inputs_are_refused(dwt):
    with pytest.raises(ValueError, match="RGB uint8"):
        dwt.embed(np.zeros((512, 512), np.uint8), dwt.payload_for("r"))
    with pytest.raises(ValueError, match="bits"):
        dwt.embed(photo("coffee"), b"\x00" * 8)


# --- survival on real photographs (dwtDctSvd) ------------------------------------------------
@pytest.fixture(scope="module")
def marked_photos(dwt) -> dict[str, np.ndarray]:
    return {name: dwt.embed(photo(name), dwt.payload_for(f"request-{name}")).image for name in PHOTOS}


@pytest.mark.parametrize("name", PHOTOS)
def test_the_mark_survives_jpeg_q80(dwt, marked_photos, name):
    payload = dwt.payload_for(f"request-{name}")
    assert dwt.verify(marked_photos[name], payload).matching_bits == 32
    assert dwt.verify(jpeg(marked_photos[name]), payload).present


@pytest.mark.parametrize("name", PHOTOS)
def test_the_mark_survives_a_075_resize_plus_jpeg_when_scaled_back(dwt, marked_photos, name):
    payload = dwt.payload_for(f"request-{name}")
    resized = jpeg(shrink(marked_photos[name], 0.75))
    assert resized.shape[:2] == (384, 384)
    assert dwt.verify(resized, payload, expected_size=(512, 512)).present
    # Decoded at the smaller size the 4x4 blocks no longer line up: the bits are chance.
    assert not dwt.verify(resized, payload).present


def test_another_requests_payload_is_not_found_in_a_marked_image(dwt, marked_photos):
    check = dwt.verify(jpeg(marked_photos["astronaut"]), dwt.payload_for("some-other-request"))
    assert not check.present and check.matching_bits < check.threshold


def test_flat_saturated_images_do_not_carry_the_mark(dwt):
    """A known limitation, measured: a binary silhouette (pure black and white) clips the chroma
    change when converted back to RGB, so even the untouched marked image reads as unmarked."""
    horse = cv2.resize(skimage.data.horse().astype(np.uint8) * 255, (512, 512), interpolation=cv2.INTER_NEAREST)
    image = np.repeat(horse[..., None], 3, axis=2)
    payload = dwt.payload_for("request-horse")
    result = dwt.embed(image, payload)
    assert result.marked
    assert not dwt.verify(result.image, payload).present


# --- false positives --------------------------------------------------------------------------
def unmarked_samples(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random crops and resizes of skimage photographs, and random noise images, 256..512 a side."""
    sources = [getattr(skimage.data, name)()[..., :3] for name in ("astronaut", "coffee", "chelsea", "rocket")]
    samples = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(256, 513, 2))
        if index % 4 == 3:
            samples.append(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            continue
        source = sources[index % len(sources)]
        crop_h = int(rng.integers(min(200, source.shape[0]), source.shape[0] + 1))
        crop_w = int(rng.integers(min(200, source.shape[1]), source.shape[1] + 1))
        top = int(rng.integers(0, source.shape[0] - crop_h + 1))
        left = int(rng.integers(0, source.shape[1] - crop_w + 1))
        crop = np.ascontiguousarray(source[top:top + crop_h, left:left + crop_w])
        samples.append(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))
    return samples


def test_unmarked_images_are_not_reported_as_marked(dwt):
    rng = np.random.default_rng(12)
    matches = []
    for image in unmarked_samples(200, rng):
        payload = rng.bytes(4)
        check = dwt.verify(image, payload)
        matches.append(check.matching_bits)
        assert not check.present, f"false positive: {check}"
    # Agreement with a random payload is Binomial(32, 1/2): mean 16, sd 2.8.
    assert 14.5 < float(np.mean(matches)) < 17.5
    assert max(matches) < 29


# --- cost, both methods -----------------------------------------------------------------------
def test_dwt_embed_and_decode_of_512x512_take_well_under_a_second(dwt):
    image, payload = photo("coffee"), dwt.payload_for("timing")
    start = time.perf_counter()
    marked = dwt.embed(image, payload).image
    embedded = time.perf_counter()
    assert dwt.verify(marked, payload).present
    decoded = time.perf_counter()
    assert embedded - start < 1.0 and decoded - embedded < 1.0, (embedded - start, decoded - embedded)


def test_rivagan_marks_a_photo_that_survives_jpeg_and_a_scaled_back_resize():
    """rivaGan costs seconds per image on CPU: one embed, three decodes, in one test."""
    riva = Watermarker("rivaGan", 32)
    image, payload = photo("astronaut"), riva.payload_for("request-riva")
    start = time.perf_counter()
    result = riva.embed(image, payload)
    embed_seconds = time.perf_counter() - start
    assert result.marked and cv2.PSNR(image, result.image) > 35
    assert riva.verify(jpeg(result.image), payload).present
    assert riva.verify(jpeg(shrink(result.image, 0.75)), payload, expected_size=(512, 512)).present
    assert not riva.verify(jpeg(result.image), riva.payload_for("another-request")).present
    assert embed_seconds < 30
