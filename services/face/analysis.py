"""Face analysis compute: detection, 5-point landmarks, gender / age where the pack has them, and
an identity embedding. Plain numpy / onnxruntime / dlib; no gRPC here (services.face.servicer
wraps it).

Two backends behind one interface, ``FaceAnalyzer.analyze(rgb) -> [DetectedFace]``:

``InsightFacePack``
    An insightface model pack directory (antelopev2, buffalo_l, ...: ``*.onnx`` files, or a
    manifest.json package) run by insightface's own code (``insightface.app.FaceAnalysis``:
    SCRFD detection, ArcFace recognition, genderage). The directory is loaded as it is: insightface
    is given its absolute path, which it opens directly; it is never asked to download anything.
    Scores are SCRFD's probabilities; the pack's own threshold is insightface's 0.5.

``DlibPack``
    The embedded default, real weights from PyPI (diffmesh.models.face_packs.build_dlib_pack):
    dlib's HOG frontal face detector, its 68-point shape predictor (reduced to insightface's five
    points) and its ResNet 128-d identity model. No gender / age ("unknown", not guessed).
    HOG gives an SVM margin, not a probability: the score reported is ``1 / (1 + exp(-3 margin))``,
    monotonic, 0.5 at dlib's own decision threshold (margin 0), which is the pack's own threshold
    (min_score 0). A lower min_score lowers dlib's threshold accordingly (0.3 is margin -0.28);
    on insightface's t1.jpg the six faces have margins 0.37..2.8 (scores 0.75..1.0) and the best
    non-face -0.48 (0.19).

Boxes are image pixels (x1, y1, x2, y2), x2 / y2 exclusive, clipped to the image; landmarks are
not clipped. ``min_score`` 0 means the pack's own threshold; ``max_faces`` keeps the highest
scores (0: all); results are sorted by score, highest first.

Faces are personal data: nothing here logs an image, a crop, a landmark or an embedding
(DetectedFace's repr leaves them out too); log lines carry paths, counts and model ids only.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from diffmesh.models.face_packs import (
    DLIB_BACKEND,
    DLIB_DEFAULT_UPSAMPLE,
    DLIB_EMBEDDING_DIM,
    DLIB_EMBEDDING_MODEL,
    DLIB_PACK_FILES,
    DLIB_RECOGNITION_MODEL,
    DLIB_SHAPE_PREDICTOR,
    FACE_PACK_MANIFEST,
    read_face_pack_manifest,
)
from diffmesh.models.registry import Kind, ModelEntry, ModelError

log = logging.getLogger(__name__)

# insightface 2.1's alignment calls scikit-image's deprecated SimilarityTransform.estimate on every
# face: a FutureWarning per face is noise, not news.
warnings.filterwarnings("ignore", message=r"`estimate` is deprecated", category=FutureWarning,
                        module=r"insightface\.utils\.face_align")

DLIB_SAME_PERSON_DISTANCE = 0.6   # dlib's convention: euclidean distance of raw 128-d descriptors
DLIB_SCORE_SLOPE = 3.0            # score = logistic(DLIB_SCORE_SLOPE * HOG margin)
INSIGHTFACE_DET_THRESH = 0.5      # insightface's default detection threshold
INSIGHTFACE_DET_SIZE = (640, 640)
# PhotoMaker's fallback when a reference shows no face at 640: smaller detector inputs, in turn.
RETRY_DET_SIZES: tuple[int, ...] = (640, 576, 512, 448, 384, 320, 256)
INSIGHTFACE_MODULES = ("detection", "recognition", "genderage")
MANIFEST_PACKAGE = "manifest.json"  # insightface's manifest-v2 model packages


@dataclass
class DetectedFace:
    box: tuple[float, float, float, float]              # x1, y1, x2, y2 image pixels (x2/y2 exclusive)
    landmarks: np.ndarray = field(repr=False)           # float32 [5, 2], insightface's order
    score: float = 0.0                                  # detection score in [0, 1]
    gender: str | None = None                           # "female" / "male" / None: not estimated
    age: float | None = None                            # years, where the pack estimates it
    embedding: np.ndarray | None = field(default=None, repr=False)         # float32 [D], raw
    normed_embedding: np.ndarray | None = field(default=None, repr=False)  # float32 [D], L2-normalised
    embedding_model: str = ""


@dataclass
class _Candidate:
    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float
    native: Any = None  # the backend's own detection (insightface Face / dlib rectangle)


class FaceAnalyzer:
    """A loaded face pack. Subclasses set the attributes and implement _detect / _describe."""

    model_id: str
    embedding_dim: int        # D of every embedding (0: the pack has no recognition model)
    embedding_model: str      # e.g. "arcface-512 (antelopev2)", "dlib-resnet-128"
    backend: str              # "insightface" / "dlib"
    default_min_score: float  # the pack's own threshold, used when min_score is 0

    def analyze(self, image: np.ndarray, min_score: float = 0.0, max_faces: int = 0, embeddings: bool = True,
                retry_smaller: bool = False) -> list[DetectedFace]:
        """Faces of one uint8 [H, W, 3] RGB image, highest score first.

        min_score: keep scores >= this (0: the pack's own threshold). max_faces: keep the best k
        (0: all). embeddings: False skips the identity model (detection, landmarks, gender / age
        only). retry_smaller: when nothing is found, try smaller detector inputs (PhotoMaker's
        640 -> 256 fallback; insightface packs with a dynamic-size detector only)."""
        image = _as_rgb(image)
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], not {min_score}")
        if max_faces < 0:
            raise ValueError(f"max_faces must be >= 0, not {max_faces}")
        threshold = float(min_score) if min_score > 0 else self.default_min_score
        found = [c for c in self._detect(image, threshold, retry_smaller) if c.score >= threshold]
        found.sort(key=lambda c: -c.score)  # stable: ties keep the detector's order
        if max_faces:
            found = found[:max_faces]
        if not found:
            return []
        return self._describe(image, found, embeddings)

    def _detect(self, image: np.ndarray, threshold: float, retry_smaller: bool) -> list[_Candidate]:
        raise NotImplementedError

    def _describe(self, image: np.ndarray, found: list[_Candidate], embeddings: bool) -> list[DetectedFace]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, embedding_model={self.embedding_model!r})"


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {list(image.shape)}")
    return np.ascontiguousarray(image)


def _clip_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def _normed(embedding: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(embedding))
    return (embedding / norm).astype(np.float32) if norm > 0 else embedding.astype(np.float32)


def identity_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two raw embeddings (dlib's convention: < 0.6 is the same person)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes: {a.size} and {b.size}")
    return float(np.linalg.norm(a - b))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (raw or normed); 0 when either is all zeros."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes: {a.size} and {b.size}")
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norms) if norms > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# insightface


def onnx_providers(device: str = "cpu") -> tuple[list[Any], int]:
    """(onnxruntime providers, insightface ctx_id) for a device string: CUDA first for a "cuda"
    device when this onnxruntime has it, else CPU only (ctx_id -1)."""
    import onnxruntime

    device = str(device or "cpu")
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
        log.warning("face pack on %s: this onnxruntime has no CUDAExecutionProvider; running on CPU", device)
    return ["CPUExecutionProvider"], -1


class InsightFacePack(FaceAnalyzer):
    backend = "insightface"

    def __init__(self, path: Path, model_id: str = "", device: str = "cpu",
                 det_size: tuple[int, int] = INSIGHTFACE_DET_SIZE, det_thresh: float = INSIGHTFACE_DET_THRESH) -> None:
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise ModelError(f"insightface pack {path}: not a directory")
        has_manifest = (path / MANIFEST_PACKAGE).is_file()
        if not has_manifest and not glob.glob(os.path.join(str(path), "*.onnx")):
            raise ModelError(f"insightface pack {path}: no *.onnx model files")
        from insightface.app import FaceAnalysis

        providers, ctx_id = onnx_providers(device)
        try:
            # An existing directory given by absolute path is opened as it is (root is never
            # consulted); a missing one would make insightface try to download: checked above.
            app = FaceAnalysis(name=str(path), root=str(path.parent), providers=providers,
                               allowed_modules=list(INSIGHTFACE_MODULES))
        except AssertionError as exc:  # insightface asserts "detection" in its models
            raise ModelError(f"insightface pack {path}: no face detection model (SCRFD) among its "
                             f"ONNX files") from exc
        except Exception as exc:  # a corrupt file, an unsupported manifest, ...
            raise ModelError(f"insightface pack {path}: cannot load: {type(exc).__name__}: {exc}") from exc
        if "detection" not in app.models:
            raise ModelError(f"insightface pack {path}: no face detection model (SCRFD)")
        app.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=tuple(det_size))
        self._app = app
        self._det = app.models["detection"]
        self._others = [(task, model) for task, model in app.models.items() if task != "detection"]
        self.path = path
        self.model_id = model_id or path.name
        self.det_size = (int(det_size[0]), int(det_size[1]))
        self.default_min_score = float(det_thresh)
        recognition = app.models.get("recognition")
        self.embedding_dim = self._embedding_dim(recognition) if recognition is not None else 0
        self.embedding_model = f"arcface-{self.embedding_dim} ({path.name})" if recognition is not None else ""
        self.providers = list(getattr(self._det.session, "get_providers", lambda: [])())
        log.info("face pack %s (insightface, %s): models %s on %s", self.model_id, path,
                 ", ".join(sorted(app.models)), ", ".join(self.providers) or "?")

    @staticmethod
    def _embedding_dim(recognition: Any) -> int:
        shape = getattr(recognition, "output_shape", None)
        if shape is not None and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
            return int(shape[1])
        size = int(recognition.input_size[0])
        return int(np.asarray(recognition.get_feat(np.zeros((size, size, 3), np.uint8))).reshape(-1).shape[0])

    def _sizes(self, retry_smaller: bool) -> list[tuple[int, int]]:
        sizes = [self.det_size]
        if retry_smaller and getattr(self._det, "static_input_size", None) is None:
            sizes += [(s, s) for s in RETRY_DET_SIZES if s < max(self.det_size)]
        return sizes

    def _detect(self, image: np.ndarray, threshold: float, retry_smaller: bool) -> list[_Candidate]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        height, width = image.shape[:2]
        for size in self._sizes(retry_smaller):
            bboxes, kpss = self._det.detect(bgr, input_size=size, max_num=0, det_thresh=threshold)
            if bboxes.shape[0]:
                break
        else:
            return []
        found = []
        for i in range(bboxes.shape[0]):
            kps = kpss[i] if kpss is not None else None
            landmarks = (np.asarray(kps, dtype=np.float32).reshape(5, 2) if kps is not None
                         else np.full((5, 2), np.nan, dtype=np.float32))
            score = float(np.clip(bboxes[i, 4], 0.0, 1.0))
            found.append(_Candidate(box=_clip_box(bboxes[i, :4], width, height), landmarks=landmarks, score=score,
                                    native=(bboxes[i, :4].copy(), kps, bboxes[i, 4])))
        return found  # NMS'd and sorted by score by insightface

    def _describe(self, image: np.ndarray, found: list[_Candidate], embeddings: bool) -> list[DetectedFace]:
        from insightface.app.common import Face

        bgr = np.ascontiguousarray(image[:, :, ::-1])
        out = []
        for candidate in found:
            bbox, kps, det_score = candidate.native
            face = Face(bbox=bbox, kps=kps, det_score=det_score)
            for task, model in self._others:
                if task == "recognition" and (not embeddings or kps is None):
                    continue
                model.get(bgr, face)
            gender = None if face.gender is None else ("male" if int(face.gender) == 1 else "female")
            age = None if face.age is None else float(face.age)
            raw = normed = None
            if face.embedding is not None:
                raw = np.asarray(face.embedding, dtype=np.float32).reshape(-1).copy()
                normed = _normed(raw)
            out.append(DetectedFace(box=candidate.box, landmarks=candidate.landmarks, score=candidate.score,
                                    gender=gender, age=age, embedding=raw, normed_embedding=normed,
                                    embedding_model=self.embedding_model))
        return out


# ---------------------------------------------------------------------------------------------
# dlib


def _logistic(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def dlib_score(margin: float) -> float:
    """HOG detection margin -> score in [0, 1]: logistic(3 margin), 0.5 at dlib's threshold 0."""
    return _logistic(DLIB_SCORE_SLOPE * float(margin))


def dlib_margin(score: float) -> float:
    """The inverse of dlib_score (clamped away from 0 and 1)."""
    score = min(max(float(score), 1e-6), 1.0 - 1e-6)
    return math.log(score / (1.0 - score)) / DLIB_SCORE_SLOPE


class DlibPack(FaceAnalyzer):
    """dlib HOG detection + 68-point landmarks (-> 5) + ResNet 128-d descriptors.

    upsample: the HOG detector's pyramid upsampling (1: faces down to about 40 px; 0: 80 px, about
    4x faster). Images longer than max_detect_side are detected on a downscaled copy (landmarks and
    embeddings still use the full image). dlib's models are not safe to share between threads:
    calls are serialised by a lock."""

    backend = DLIB_BACKEND
    default_min_score = 0.5  # dlib_score(0): dlib's own threshold

    def __init__(self, path: Path, model_id: str = "", upsample: int | None = None,
                 max_detect_side: int = 2048) -> None:
        import dlib

        path = Path(path).expanduser().absolute()
        manifest = read_face_pack_manifest(path) or {}
        if manifest and manifest.get("backend") != DLIB_BACKEND:
            raise ModelError(f"{path / FACE_PACK_MANIFEST}: backend {manifest.get('backend')!r} is not 'dlib'")
        detector_cfg = manifest.get("detector") if isinstance(manifest.get("detector"), dict) else {}
        if upsample is None:
            upsample = detector_cfg.get("upsample", DLIB_DEFAULT_UPSAMPLE)
        if not isinstance(upsample, int) or isinstance(upsample, bool) or not 0 <= upsample <= 3:
            raise ModelError(f"dlib pack {path}: detector upsample must be an integer in 0..3, not {upsample!r}")
        files = {}
        for key, default in (("shape_predictor", DLIB_SHAPE_PREDICTOR), ("recognition_model", DLIB_RECOGNITION_MODEL)):
            name = manifest.get(key, default)
            file = path / str(name)
            if not file.is_file():  # a broken symlink too
                raise ModelError(f"dlib pack {path}: {file} not found"
                                 + (" (a broken link)" if file.is_symlink() else ""))
            files[key] = file
        try:
            self._detector = dlib.get_frontal_face_detector()
            self._predictor = dlib.shape_predictor(str(files["shape_predictor"]))
            self._recognizer = dlib.face_recognition_model_v1(str(files["recognition_model"]))
        except RuntimeError as exc:
            raise ModelError(f"dlib pack {path}: cannot load its models: {exc}") from exc
        self._dlib = dlib
        self._lock = threading.Lock()
        self.path = path
        self.model_id = model_id or path.name
        self.upsample = int(upsample)
        self.max_detect_side = int(max_detect_side)
        self.embedding_dim = DLIB_EMBEDDING_DIM
        self.embedding_model = DLIB_EMBEDDING_MODEL
        log.info("face pack %s (dlib HOG, upsample %d, %s)", self.model_id, self.upsample, path)

    def _detect(self, image: np.ndarray, threshold: float, retry_smaller: bool) -> list[_Candidate]:
        import cv2

        dlib = self._dlib
        height, width = image.shape[:2]
        scale = 1.0
        work = image
        if max(height, width) > self.max_detect_side:
            scale = self.max_detect_side / max(height, width)
            work = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))),
                              interpolation=cv2.INTER_AREA)
        # dlib keeps detections whose margin exceeds adjust_threshold; the score filter is exact.
        with self._lock:
            rects, margins, _ = self._detector.run(work, self.upsample, dlib_margin(threshold) - 1e-6)
        found = []
        for rect, m in zip(rects, margins):
            # dlib rectangles are inclusive; boxes here are exclusive on the right / bottom.
            x1, y1, x2, y2 = rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale, (rect.bottom() + 1) / scale
            full = dlib.rectangle(int(round(x1)), int(round(y1)), int(round(x2)) - 1, int(round(y2)) - 1)
            found.append(_Candidate(box=_clip_box((x1, y1, x2, y2), width, height),
                                    landmarks=np.zeros((5, 2), np.float32), score=dlib_score(m), native=full))
        return found

    def _describe(self, image: np.ndarray, found: list[_Candidate], embeddings: bool) -> list[DetectedFace]:
        dlib = self._dlib
        shapes = dlib.full_object_detections()
        with self._lock:
            for candidate in found:
                shapes.append(self._predictor(image, candidate.native))
            descriptors = self._recognizer.compute_face_descriptor(image, shapes) if embeddings else None
        out = []
        for i, candidate in enumerate(found):
            points = np.array([(p.x, p.y) for p in shapes[i].parts()], dtype=np.float32)
            landmarks = np.stack([points[36:42].mean(axis=0), points[42:48].mean(axis=0), points[30],
                                  points[48], points[54]]).astype(np.float32)
            raw = normed = None
            if descriptors is not None:
                raw = np.asarray(descriptors[i], dtype=np.float32).reshape(-1)
                normed = _normed(raw)
            out.append(DetectedFace(box=candidate.box, landmarks=landmarks, score=candidate.score, gender=None,
                                    age=None, embedding=raw, normed_embedding=normed,
                                    embedding_model=self.embedding_model))
        return out


# ---------------------------------------------------------------------------------------------
# loading


def pack_backend(path: Path) -> str:
    """"dlib" or "insightface" from a pack directory's contents; ModelError naming the path if
    it is neither."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"face pack {path}: not found")
    if not path.is_dir():
        raise ModelError(f"face pack {path}: not a directory (a face pack is a directory of model files)")
    manifest = read_face_pack_manifest(path)
    if manifest is not None:
        if manifest["backend"] == DLIB_BACKEND:
            return DLIB_BACKEND
        if manifest["backend"] == "insightface":
            return "insightface"
        raise ModelError(f"{path / FACE_PACK_MANIFEST}: unknown backend {manifest['backend']!r} "
                         f"(known: dlib, insightface)")
    if glob.glob(os.path.join(str(path), "*.onnx")) or (path / MANIFEST_PACKAGE).is_file():
        return "insightface"
    if all((path / name).exists() or (path / name).is_symlink() for name in DLIB_PACK_FILES):
        return DLIB_BACKEND
    raise ModelError(f"face pack {path}: neither an insightface pack (*.onnx files) nor a dlib pack "
                     f"({FACE_PACK_MANIFEST} or {', '.join(DLIB_PACK_FILES)})")


def load_face_pack(entry: ModelEntry, device: str = "cpu") -> FaceAnalyzer:
    """The face pack of a registry entry (kind face_analysis), backend picked from its directory.

    A missing or invalid pack is a ModelError naming its path: never a stand-in."""
    if entry.kind is not Kind.FACE_ANALYSIS:
        raise ModelError(f"model {entry.id!r} ({entry.kind.value}, {entry.path}) is not a face_analysis pack")
    path = Path(entry.path)
    try:
        backend = pack_backend(path)
        if backend == DLIB_BACKEND:
            return DlibPack(path, model_id=entry.id)
        return InsightFacePack(path, model_id=entry.id, device=device)
    except ModelError as exc:
        raise ModelError(f"model {entry.id!r}: {exc}") from exc
