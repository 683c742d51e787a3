"""The NSFW detector: nudenet 3.4.2's bundled YOLOv8 ONNX model (320n.onnx), run with onnxruntime.

nudenet's own `NudeDetector` is not used as is because it ignores its `providers` argument (the
line is commented out in 3.4.2), so it never runs on CUDA. Its pre- and postprocessing are reused:

- `_read_image` pads the image at the bottom and right to a square (black) and only then resizes
  to 320x320, so the content keeps its aspect ratio (a squashed image gives different scores:
  a squashed coffee photo scored BUTTOCKS_COVERED 0.32). Box coordinates come back in the
  original image's pixels and are clipped to it.
- `_postprocess` keeps rows scoring >= 0.2 (the detector's floor, not a policy threshold) and runs
  class-agnostic NMS (score 0.25, IoU 0.45).

Channel order: `_read_image` applies COLOR_RGBA2BGR (which swaps R and B of a 3-channel image)
and then blobFromImage(swapRB=True), i.e. two swaps. Given a file path (cv2.imread, BGR) that
feeds the model BGR, which is nudenet issue #203; given an RGB array, as here, the two swaps
cancel and the model sees RGB, the order Ultralytics models are trained on.
"""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime
from nudenet import nudenet as _nudenet

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# Module-level name in nudenet; read with getattr because `_nudenet.__labels` inside a class body
# would be name-mangled.
NUDENET_LABELS: tuple[str, ...] = tuple(getattr(_nudenet, "__labels"))
DEFAULT_INPUT_SIZE = 320


def bundled_model_path() -> Path:
    """nudenet's 320n.onnx, shipped inside the nudenet package."""
    return Path(_nudenet.__file__).resolve().parent / "320n.onnx"


@dataclass(frozen=True)
class Detection:
    label: str                           # nudenet class name, e.g. "FEMALE_BREAST_EXPOSED"
    score: float                         # in [0.2, 1]: the detector reports nothing below 0.2
    box: tuple[int, int, int, int]       # x, y, w, h in the image's pixels


def default_providers() -> list[str]:
    """CUDA first where this onnxruntime build has it (onnxruntime-gpu), CPU always."""
    available = onnxruntime.get_available_providers()
    return [CUDA_PROVIDER, CPU_PROVIDER] if CUDA_PROVIDER in available else [CPU_PROVIDER]


def _usable_providers(requested: Sequence[str]) -> list[str]:
    """The requested providers this onnxruntime build has, CPU appended as the fallback; the
    dropped ones are logged (asking for CUDA on a CPU-only build is a deployment mistake worth
    seeing, but not a reason to refuse to start)."""
    available = set(onnxruntime.get_available_providers())
    usable = [p for p in requested if p in available]
    dropped = [p for p in requested if p not in available]
    if dropped:
        log.warning("onnxruntime lacks providers %s (has %s); NSFW detector uses %s",
                    dropped, sorted(available), usable or [CPU_PROVIDER])
    if CPU_PROVIDER not in usable:
        usable.append(CPU_PROVIDER)
    return usable


class NsfwDetector:
    """nudenet's detector on uint8 RGB images. Thread-safe: one onnxruntime session, whose run()
    may be called concurrently, and pure functions around it."""

    def __init__(self, model_path: str | None = None, providers: Sequence[str] | None = None) -> None:
        path = Path(model_path) if model_path else bundled_model_path()
        if not path.is_file():
            hint = "" if model_path else " (nudenet's bundled 320n.onnx; is nudenet 3.4.2 installed?)"
            raise FileNotFoundError(f"NSFW detector model not found: {path}{hint}")
        self.model_path = str(path)
        self._session = onnxruntime.InferenceSession(
            self.model_path, providers=_usable_providers(providers) if providers else default_providers())
        self._input_name = self._session.get_inputs()[0].name
        metadata = self._session.get_modelmeta().custom_metadata_map
        self._input_size = _input_size(metadata, self.model_path)
        _check_labels(metadata, self._session, self.model_path)

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names the detector can report."""
        return NUDENET_LABELS

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on, preferred first."""
        return self._session.get_providers()

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Detections of one HxWx3 uint8 RGB image, highest score first."""
        _check_image(image)
        blob, x_ratio, y_ratio, x_pad, y_pad, width, height = _nudenet._read_image(
            np.ascontiguousarray(image), self._input_size)
        outputs = self._session.run(None, {self._input_name: blob})
        found = _nudenet._postprocess(outputs, x_pad, y_pad, x_ratio, y_ratio, width, height,
                                      self._input_size, self._input_size)
        detections = [Detection(d["class"], float(d["score"]), tuple(int(v) for v in d["box"])) for d in found]
        return sorted(detections, key=lambda d: -d.score)

    def __repr__(self) -> str:
        return f"NsfwDetector(model_path={self.model_path!r}, providers={self.providers!r})"


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"NSFW detector takes an HxWx3 uint8 RGB image, got shape {shape} dtype {dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"NSFW detector got an empty image of shape {image.shape}")


def _input_size(metadata: dict[str, str], path: str) -> int:
    """The square input size the model was exported for (Ultralytics writes `imgsz`)."""
    if "imgsz" not in metadata:
        return DEFAULT_INPUT_SIZE
    size = ast.literal_eval(metadata["imgsz"])
    if not (isinstance(size, list) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int)):
        raise ValueError(f"{path}: expected a square imgsz in the model metadata, got {metadata['imgsz']!r}")
    return size[0]


def _check_labels(metadata: dict[str, str], session: onnxruntime.InferenceSession, path: str) -> None:
    """nudenet's _postprocess names classes from its own fixed list; a model with other classes
    would be silently mislabelled, so it is refused here."""
    if "names" in metadata:
        names = ast.literal_eval(metadata["names"])
        model_labels = tuple(names[i] for i in sorted(names))
        if model_labels != NUDENET_LABELS:
            raise ValueError(f"{path}: the model's classes {model_labels} are not nudenet's {NUDENET_LABELS}")
    channels = session.get_outputs()[0].shape[1]
    if isinstance(channels, int) and channels != 4 + len(NUDENET_LABELS):
        raise ValueError(f"{path}: output has {channels} channels per box, nudenet's "
                         f"{len(NUDENET_LABELS)} classes need {4 + len(NUDENET_LABELS)}")
