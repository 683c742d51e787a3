"""Face analysis packs (registry kind ``face_analysis``) that can be made offline.

Two builders, both deterministic:

``build_dlib_pack(dir)``
    The embedded default with real weights from PyPI: a directory of symlinks to the model files
    that ``face_recognition_models`` ships (dlib's 68-point shape predictor and its ResNet
    128-d identity model) plus a small ``face_pack.json`` manifest (``{"backend": "dlib", ...}``).
    Detection is dlib's HOG frontal face detector, built into dlib itself (no file).

``build_tiny_insightface_pack(dir)``
    A few-KB insightface-format pack for tests: three ONNX models made with ``onnx.helper`` that
    insightface's own ``model_zoo`` routes by shape and runs with its own pre/post-processing:

    * ``det_tiny.onnx``: SCRFD layout (9 outputs: scores, boxes and keypoints for strides 8, 16, 32,
      2 anchors each), fixed input ``[1, 3, D, D]`` (D = ``det_input``, 640 by default). Its outputs
      are constant planted maps (they depend on the input only through ``0 * mean(input)``): every
      anchor scores 0 except one anchor per planted face, whose box and keypoint distances decode
      (insightface's ``distance2bbox`` / ``distance2kps``) to exactly that face. So insightface's
      real decoding + NMS finds exactly the planted faces, on any image. Planted coordinates are
      in **detector-input pixels**: insightface letterboxes the image into the D x D input (resize
      keeping the aspect ratio, pad right/bottom) and divides the decoded boxes by its scale, so
      the faces it reports for a W x H image are ``expected_faces(faces, W, H)``.
    * ``genderage.onnx``: input ``[N, 3, 96, 96]``, output ``[N, 3]`` = (gender logits, age/100)
      computed from m, the mean of the normalised crop that insightface's ``Attribute`` makes
      ((pixel - 127.5) / 128, so m is in [-1, 1]): logits ``(-m, m)`` (male iff the crop is
      brighter than mid-grey: m > 0), age/100 ``0.35 + 0.25 m`` (ages 10..60).
      ``tiny_genderage(image_rgb, box)`` reproduces it.
    * ``arcface_tiny.onnx``: input ``[N, 3, 112, 112]`` (the aligned crop), output ``[N, D_emb]``:
      4 x 4 average pooling of each colour channel (48 values), minus their mean, times a fixed
      seeded ``[48, D_emb]`` matrix. Same crop, same embedding; different faces, different ones.

    ``planted_faces.json`` in the pack records what was planted (insightface ignores it).

Planted boxes must not overlap by more than insightface's NMS threshold (IoU 0.4) and must use
different anchors; the builder refuses otherwise, so the expectation always holds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from diffmesh.models.registry import ModelError

# ---------------------------------------------------------------------------------------------
# dlib pack

FACE_PACK_MANIFEST = "face_pack.json"
DLIB_BACKEND = "dlib"
DLIB_SHAPE_PREDICTOR = "shape_predictor_68_face_landmarks.dat"
DLIB_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_PACK_FILES: tuple[str, ...] = (DLIB_SHAPE_PREDICTOR, DLIB_RECOGNITION_MODEL)
DLIB_EMBEDDING_DIM = 128
DLIB_EMBEDDING_MODEL = "dlib-resnet-128"
DLIB_DEFAULT_UPSAMPLE = 1
_MANIFEST_FORMAT = 1


def face_recognition_models_dir() -> Path:
    """The ``models`` folder of the installed ``face_recognition_models`` package.

    Found with importlib.util.find_spec, never imported: its ``__init__`` imports pkg_resources,
    which recent setuptools no longer ship."""
    spec = importlib.util.find_spec("face_recognition_models")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelError("the face_recognition_models package is not installed (it ships dlib's face "
                         "model files: pip install face_recognition_models)")
    return Path(locations[0]) / "models"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dlib_manifest(upsample: int = DLIB_DEFAULT_UPSAMPLE) -> dict[str, Any]:
    version = _package_version("face_recognition_models")
    return {
        "backend": DLIB_BACKEND,
        "format": _MANIFEST_FORMAT,
        "detector": {"type": "hog", "upsample": int(upsample)},
        "shape_predictor": DLIB_SHAPE_PREDICTOR,
        "recognition_model": DLIB_RECOGNITION_MODEL,
        "embedding_dim": DLIB_EMBEDDING_DIM,
        "embedding_model": DLIB_EMBEDDING_MODEL,
        "source": f"face_recognition_models {version}" if version else "face_recognition_models",
    }


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_symlink(target: Path, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def build_dlib_pack(dir: Path, upsample: int = DLIB_DEFAULT_UPSAMPLE) -> Path:
    """Make ``dir`` a dlib face pack: symlinks to face_recognition_models' files + face_pack.json.

    Idempotent (existing links are replaced). ModelError when the package or a file is missing."""
    dir = Path(dir)
    source = face_recognition_models_dir()
    missing = [str(source / name) for name in DLIB_PACK_FILES if not (source / name).is_file()]
    if missing:
        raise ModelError(f"face_recognition_models is incomplete: {', '.join(missing)} not found")
    if upsample < 0:
        raise ValueError(f"upsample must be >= 0, not {upsample}")
    dir.mkdir(parents=True, exist_ok=True)
    for name in DLIB_PACK_FILES:
        _atomic_symlink((source / name).resolve(), dir / name)
    _atomic_write_text(dir / FACE_PACK_MANIFEST, json.dumps(dlib_manifest(upsample), indent=2) + "\n")
    return dir


def read_face_pack_manifest(dir: Path) -> dict[str, Any] | None:
    """``dir/face_pack.json`` parsed, None when absent; ModelError naming it when malformed."""
    path = Path(dir) / FACE_PACK_MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("backend"), str):
        raise ModelError(f"{path}: expected a JSON object with a 'backend' (e.g. \"dlib\")")
    return data


# ---------------------------------------------------------------------------------------------
# tiny insightface pack

TINY_DET_FILE = "det_tiny.onnx"
TINY_GENDERAGE_FILE = "genderage.onnx"
TINY_ARCFACE_FILE = "arcface_tiny.onnx"
TINY_PLANTED_FILE = "planted_faces.json"
TINY_DET_INPUT = 640
TINY_EMBEDDING_DIM = 512
_STRIDES = (8, 16, 32)
_NUM_ANCHORS = 2
_NMS_THRESH = 0.4  # insightface SCRFD's
_ARCFACE_SEED = 20240601
_OPSET = 13
_IR_VERSION = 8

# insightface's ArcFace alignment template (112 x 112), used to derive default landmarks.
_ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                              [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64) / 112.0


@dataclass(frozen=True)
class PlantedFace:
    """One face the tiny detector reports, in detector-input pixels (0..det_input).

    landmarks: five (x, y) in insightface's order; None: placed in the box like ArcFace's
    alignment template."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: tuple[tuple[float, float], ...] | None = None

    def points(self) -> np.ndarray:
        if self.landmarks is not None:
            points = np.asarray(self.landmarks, dtype=np.float64)
            if points.shape != (5, 2):
                raise ValueError(f"planted landmarks must be 5 (x, y) pairs, got shape {points.shape}")
            return points
        x1, y1, x2, y2 = self.box
        return np.stack([x1 + _ARCFACE_TEMPLATE[:, 0] * (x2 - x1), y1 + _ARCFACE_TEMPLATE[:, 1] * (y2 - y1)], axis=1)


# The default plant sits on four of the six faces of insightface's data/images/t1.jpg
# (1280 x 886: det scale 0.5, so image pixels = 2 x these), the last one below insightface's
# default 0.5 detection threshold.
TINY_FACES: tuple[PlantedFace, ...] = (
    PlantedFace(box=(556.0, 136.0, 616.0, 200.0), score=0.92),
    PlantedFace(box=(30.0, 136.0, 90.0, 200.0), score=0.81),
    PlantedFace(box=(359.0, 180.0, 419.0, 242.0), score=0.66),
    PlantedFace(box=(222.0, 144.0, 282.0, 206.0), score=0.42),
)


def det_scale(width: int, height: int, det_input: int = TINY_DET_INPUT) -> float:
    """insightface SCRFD's letterbox scale for a W x H image into a square det_input input
    (image pixels x scale = detector-input pixels), computed exactly as SCRFD does."""
    im_ratio = float(height) / width
    if im_ratio > 1.0:
        new_height = det_input
    else:
        new_width = det_input
        new_height = int(new_width * im_ratio)
    return float(new_height) / height


@dataclass(frozen=True)
class ExpectedFace:
    box: tuple[float, float, float, float]   # image pixels
    landmarks: np.ndarray                    # [5, 2] image pixels
    score: float


def expected_faces(faces: Sequence[PlantedFace], width: int, height: int,
                   det_input: int = TINY_DET_INPUT) -> list[ExpectedFace]:
    """What insightface reports for a W x H image with a tiny pack built from ``faces``: the
    planted boxes and landmarks divided by the letterbox scale, highest score first (before any
    box clipping the caller does)."""
    scale = det_scale(width, height, det_input)
    out = [ExpectedFace(box=tuple(float(v) / scale for v in face.box),  # type: ignore[arg-type]
                        landmarks=(face.points() / scale).astype(np.float32), score=float(face.score))
           for face in faces]
    return sorted(out, key=lambda face: -face.score)


def tiny_genderage(image_rgb: np.ndarray, box: Sequence[float]) -> tuple[str, int]:
    """What the tiny genderage model answers for the face at ``box`` (image pixels) of an RGB
    image: insightface Attribute's crop (centre of the box, scale 96 / (1.5 max side)), then the
    planted rule. Returns (gender, age) as insightface reports them."""
    from insightface.utils import face_align

    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1, y2 - y1
    bgr = np.ascontiguousarray(np.asarray(image_rgb)[:, :, ::-1])
    crop, _ = face_align.transform(bgr, ((x1 + x2) / 2, (y1 + y2) / 2), 96, 96 / (max(w, h) * 1.5), 0)
    m = np.float32(((crop.astype(np.float32) - np.float32(127.5)) / np.float32(128.0)).mean(dtype=np.float64))
    gender = "male" if m > 0 else "female"
    # float32 like the model (ages can differ by one from a rounding tie: compare with +-1)
    age = int(np.round((m * np.float32(0.25) + np.float32(0.35)) * np.float32(100)))
    return gender, age


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    # insightface's NMS counts pixels inclusively (+1), so do the same.
    xx1, yy1, xx2, yy2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, xx2 - xx1 + 1) * max(0.0, yy2 - yy1 + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def _stride_for(box: Sequence[float]) -> int:
    side = max(box[2] - box[0], box[3] - box[1])
    return 8 if side < 64 else 16 if side < 160 else 32


def _plant(faces: Sequence[PlantedFace], det_input: int) -> dict[int, list[tuple[int, PlantedFace]]]:
    """stride -> [(anchor row, face)], validated."""
    if det_input <= 0 or det_input % 32:
        raise ValueError(f"det_input must be a positive multiple of 32, not {det_input}")
    faces = list(faces)
    for i, face in enumerate(faces):
        x1, y1, x2, y2 = face.box
        if not (0 <= x1 < x2 <= det_input and 0 <= y1 < y2 <= det_input):
            raise ValueError(f"planted face {i}: box {face.box} must lie inside the {det_input}x{det_input} "
                             "detector input")
        if not 0.0 < face.score <= 1.0:
            raise ValueError(f"planted face {i}: score {face.score} must be in (0, 1]")
        face.points()
        for j in range(i):
            if _iou(faces[j].box, face.box) > _NMS_THRESH:
                raise ValueError(f"planted faces {j} and {i} overlap beyond insightface's NMS threshold "
                                 f"({_NMS_THRESH}): one would be suppressed")
    plan: dict[int, list[tuple[int, PlantedFace]]] = {stride: [] for stride in _STRIDES}
    used: set[tuple[int, int]] = set()
    for i, face in enumerate(faces):
        stride = _stride_for(face.box)
        grid = det_input // stride
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        gx, gy = min(grid - 1, int(round(cx / stride))), min(grid - 1, int(round(cy / stride)))
        row = (gy * grid + gx) * _NUM_ANCHORS  # the first of the location's two anchors
        if (stride, row) in used:
            raise ValueError(f"planted face {i} falls on the same detector anchor as an earlier one")
        used.add((stride, row))
        plan[stride].append((row, face))
    return plan


def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    _atomic_write_bytes(path, model.SerializeToString())


def _make_model(graph):
    from onnx import helper

    model = helper.make_model(graph, producer_name="diffmesh.face_packs", producer_version="1",
                              opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = _IR_VERSION
    return model


def _detector(faces: Sequence[PlantedFace], det_input: int):
    """SCRFD-layout detector with planted outputs (see the module docstring)."""
    from onnx import TensorProto, helper

    plan = _plant(faces, det_input)
    nodes = [
        helper.make_node("ReduceMean", ["input.1"], ["input_mean"], name="input_mean", keepdims=0),
        helper.make_node("Mul", ["input_mean", "zero"], ["input_zero"], name="input_zero"),
    ]
    inits = [_tensor("zero", np.array(0.0, dtype=np.float32))]
    outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in _STRIDES:
            rows = (det_input // stride) ** 2 * _NUM_ANCHORS
            name = f"{kind}_{stride}"
            planted = plan[stride]
            indices = np.array([[row] for row, _ in planted], dtype=np.int64).reshape(len(planted), 1)
            updates = np.zeros((len(planted), width), dtype=np.float32)
            grid = det_input // stride
            for k, (row, face) in enumerate(planted):
                location = row // _NUM_ANCHORS
                ax, ay = (location % grid) * stride, (location // grid) * stride  # the anchor centre
                if kind == "score":
                    updates[k, 0] = face.score
                elif kind == "bbox":
                    x1, y1, x2, y2 = face.box
                    updates[k] = np.array([ax - x1, ay - y1, x2 - ax, y2 - ay]) / stride
                else:
                    updates[k] = ((face.points() - np.array([ax, ay])) / stride).reshape(-1)
            inits += [_tensor(f"{name}_shape", np.array([rows, width], dtype=np.int64)),
                      _tensor(f"{name}_indices", indices), _tensor(f"{name}_updates", updates)]
            nodes += [
                helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_zeros"], name=f"{name}_zeros",
                                 value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])),
                helper.make_node("ScatterND", [f"{name}_zeros", f"{name}_indices", f"{name}_updates"],
                                 [f"{name}_planted"], name=f"{name}_planted"),
                helper.make_node("Add", [f"{name}_planted", "input_zero"], [name], name=name),
            ]
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, width]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, det_input, det_input])],
        outputs, initializer=inits)
    return _make_model(graph)


def _genderage():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["data"], ["crop_mean4"], name="crop_mean", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["crop_mean4"], ["m"], name="flatten", axis=1),
        helper.make_node("Neg", ["m"], ["neg_m"], name="female_logit"),
        helper.make_node("Mul", ["m", "age_slope"], ["age_delta"], name="age_slope"),
        helper.make_node("Add", ["age_delta", "age_base"], ["age"], name="age"),
        helper.make_node("Concat", ["neg_m", "m", "age"], ["fc1"], name="genderage", axis=1),
    ]
    inits = [_tensor("age_slope", np.array(0.25, dtype=np.float32)),
             _tensor("age_base", np.array(0.35, dtype=np.float32))]
    graph = helper.make_graph(nodes, "tiny_genderage",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 96, 96])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 3])],
                              initializer=inits)
    return _make_model(graph)


def _arcface(embedding_dim: int):
    from onnx import TensorProto, helper

    weights = np.random.default_rng(_ARCFACE_SEED).standard_normal((48, embedding_dim)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], name="pool", kernel_shape=[28, 28],
                         strides=[28, 28]),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten", axis=1),
        helper.make_node("ReduceMean", ["features"], ["features_mean"], name="features_mean", axes=[1],
                         keepdims=1),
        helper.make_node("Sub", ["features", "features_mean"], ["centred"], name="centre"),
        helper.make_node("MatMul", ["centred", "projection"], ["683"], name="project"),
    ]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["N", embedding_dim])],
                              initializer=[_tensor("projection", weights)])
    return _make_model(graph)


def build_tiny_insightface_pack(dir: Path, faces: Iterable[PlantedFace] | None = None,
                                det_input: int = TINY_DET_INPUT, embedding_dim: int = TINY_EMBEDDING_DIM) -> Path:
    """Write the tiny insightface pack (see the module docstring) into ``dir``; returns ``dir``.

    faces: what the detector reports, in det_input pixels (default TINY_FACES)."""
    faces = tuple(TINY_FACES if faces is None else faces)
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, not {embedding_dim}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    _save(_detector(faces, det_input), dir / TINY_DET_FILE)
    _save(_genderage(), dir / TINY_GENDERAGE_FILE)
    _save(_arcface(embedding_dim), dir / TINY_ARCFACE_FILE)
    planted = {
        "det_input": det_input,
        "embedding_dim": embedding_dim,
        "coordinates": "detector-input pixels; image pixels = these / det_scale(W, H, det_input)",
        "faces": [{"box": list(face.box), "score": face.score, "landmarks": face.points().tolist()}
                  for face in faces],
    }
    _atomic_write_text(dir / TINY_PLANTED_FILE, json.dumps(planted, indent=2) + "\n")
    return dir
