"""The geometry of two-stage face detailing (ADetailer / ComfyUI FaceDetailer, batched).

Pure numpy (with PIL and cv2 for resizing, colour spaces and morphology): no gRPC, no models.
The orchestrator's face flow detects faces (face stage), then calls, in this order:

    select_faces         keep faces by score, size ratio and the k largest; reading order
    split_face_prompts   ADetailer's [SEP] / [SKIP] / [PROMPT] convention, one prompt per face
    plan_crops           one square crop per face and ONE common detailing size S for the batch
    face_masks           soft masks, at S (the denoiser's change map) and at each crop's size
    crop_and_resize      uint8 [n, S, S, 3], the crops the VAE encodes
    (encode, denoise, decode: the stages)
    composite            each detailed crop back into its image through its mask, colour-matched
    mask_png / draw_overlay / side_by_side / magnification: for reports and demos

Definitions (all in pixels of the base image unless said otherwise):

- Face box: (x1, y1, x2, y2) floats, clipped to the image before use; its long side
  L = max(x2 - x1, y2 - y1).
- padding: the context added on EACH side of the face, as a share of L. The crop is the square of
  side round(L * (1 + 2 * padding)) centred on the box centre (padding 0.5 → twice the long
  side: ComfyUI's crop_factor = 1 + 2 * padding). It is shifted (never resized) to lie inside the
  image; when the side exceeds the image's short side it becomes the largest square that fits
  (min(W, H)), still centred on the face as far as the image allows. Crops are therefore always
  square, integer, and inside the image.
- S, the common detailing size: S = min(floor_m(size), floor_m(max_i side_i * max_magnification)),
  at least m, where floor_m rounds down to a multiple of m = `multiple` (8 by default; pass 64 for
  UNets that want latents divisible by 8). Every crop is resized to S x S for one batched denoiser
  call. The largest crop is never upscaled beyond max_magnification (and a lone tiny face gives a
  small S); a smaller crop grows to S / max_magnification (up to the image's short side), taking
  more context around its face rather than more magnification, so no crop is magnified past the
  cap unless the image itself is too small. `magnification(plan)` reports each crop's factor.
- Masks: 1 = change (white = re-rendered, as the denoiser's change map). The base shape is the
  ellipse inscribed in the face box, or ("landmarks") the convex hull of the landmarks scaled
  about their centroid by the largest factor that keeps the hull's bounding box inside the face
  box (so it touches the box on at least one side), clipped to the box; fewer than 3 landmarks or
  a degenerate hull fall back to the ellipse. Then dilate (dilate > 0) or erode (dilate < 0) by
  |dilate| pixels (elliptical structuring element), then a gaussian blur of standard deviation
  `blur` pixels (PIL's / ADetailer's GaussianBlur radius), all at the crop's own resolution.
  Values below 1/255 become exactly 0 and above 1 - 1/255 exactly 1, so a pixel is either
  untouched by compositing or blended, and the face core is exactly 1.
- Composite: out = base * (1 - m) + detail * m in float, rounded; pixels where m == 0 keep the base
  exactly. Faces are pasted one after another in the order given (reading order), each over the
  result so far: where two masks overlap, the later face is blended over the earlier one.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

MASK_SHAPES = ("ellipse", "landmarks")
EPSILON = 1.0 / 255.0           # mask values below it are 0, above 1 - it are 1
STD_RATIO_RANGE = (0.5, 2.0)    # colour matching never scales a channel's spread beyond these


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected face: box (x1, y1, x2, y2) in pixels, landmarks float32 [k, 2] (insightface's
    5: left eye, right eye, nose, left mouth corner, right mouth corner; may be empty), score.
    Compared (and hashed) by identity: select_faces returns the very objects it was given."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    score: float = 1.0

    @property
    def width(self) -> float:
        return max(0.0, float(self.box[2]) - float(self.box[0]))

    @property
    def height(self) -> float:
        return max(0.0, float(self.box[3]) - float(self.box[1]))

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (float(self.box[0]) + float(self.box[2])) / 2.0, (float(self.box[1]) + float(self.box[3])) / 2.0


class FaceSelection(list):
    """select_faces' result: a list of the kept faces in reading order, with `found`, the number
    of faces detected before any filter."""

    def __init__(self, faces: Sequence[Detection] = (), found: int = 0):
        super().__init__(faces)
        self.found = found


@dataclass
class CropPlan:
    """One integer crop box (x1, y1, x2, y2) per face in the base image, and the common detailing
    size S (every crop is resized to S x S)."""

    boxes: list[tuple[int, int, int, int]]
    size: int

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(height, width) of each crop in the base image."""
        return [(y2 - y1, x2 - x1) for x1, y1, x2, y2 in self.boxes]


# --- selection ----------------------------------------------------------------------------------
def _clipped(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return x1, y1, max(x1, x2), max(y1, y2)


def reading_order(faces: Sequence[Detection]) -> list[Detection]:
    """Faces in reading order: rows top to bottom, left to right within a row.

    Rule: faces are taken by vertical centre, top first; a face joins the current row when its
    vertical centre is less than half the median face height below the centre of the row's first
    (top-most) face, else it starts a new row. A row therefore spans less than half a typical face
    (no chaining down a diagonal). Within a row faces go by horizontal centre (ties: vertical
    centre, then the given order)."""
    faces = list(faces)
    if len(faces) < 2:
        return faces
    tolerance = 0.5 * float(np.median([face.height for face in faces]))
    by_row = sorted(range(len(faces)), key=lambda i: (faces[i].center[1], faces[i].center[0], i))
    rows: list[list[int]] = []
    for i in by_row:
        if rows and faces[i].center[1] - faces[rows[-1][0]].center[1] < tolerance:
            rows[-1].append(i)
        else:
            rows.append([i])
    ordered: list[Detection] = []
    for row in rows:
        ordered.extend(faces[i] for i in sorted(row, key=lambda i: (faces[i].center[0], faces[i].center[1], i)))
    return ordered


def select_faces(detections: Sequence[Detection], image_w: int, image_h: int, confidence: float = 0.3,
                 min_ratio: float = 0.0, max_ratio: float = 1.0, max_faces: int = 0) -> FaceSelection:
    """The faces to detail, in reading order (see `reading_order`).

    Kept: score >= confidence and min_ratio <= box area / image area <= max_ratio (the box clipped
    to the image); then, when max_faces > 0, the max_faces largest by area (ties: higher score,
    then detection order). Boxes are returned as given (not clipped). `.found` on the result is
    len(detections), the count before any filter."""
    image_area = float(image_w) * float(image_h)
    kept = []
    for order, face in enumerate(detections):
        x1, y1, x2, y2 = _clipped(face.box, image_w, image_h)
        area = (x2 - x1) * (y2 - y1)
        ratio = area / image_area if image_area > 0 else 0.0
        if face.score >= confidence and min_ratio <= ratio <= max_ratio and area > 0:
            kept.append((area, face.score, order, face))
    if max_faces > 0:
        kept = sorted(kept, key=lambda k: (-k[0], -k[1], k[2]))[:max_faces]
        kept.sort(key=lambda k: k[2])
    return FaceSelection(reading_order([k[3] for k in kept]), found=len(detections))


# --- prompts ------------------------------------------------------------------------------------
SEP, SKIP, PROMPT = "[SEP]", "[SKIP]", "[PROMPT]"


def split_face_prompts(face_prompt: str, main_prompt: str, count: int) -> list[str | None]:
    """One prompt per face in reading order (ADetailer's convention).

    "[SEP]" separates the segments; face j gets segment min(j, n - 1) (the last repeats). Each
    segment is stripped; one that is exactly "[SKIP]" gives None (leave that face as it is); an
    empty one (or an empty face_prompt) gives the main prompt; otherwise every "[PROMPT]" in it is
    replaced by the main prompt (the result stripped again)."""
    if count <= 0:
        return []
    segments = [segment.strip() for segment in (face_prompt or "").split(SEP)]
    prompts: list[str | None] = []
    for j in range(count):
        segment = segments[min(j, len(segments) - 1)]
        if segment == SKIP:
            prompts.append(None)
        elif not segment:
            prompts.append(main_prompt)
        else:
            prompts.append(segment.replace(PROMPT, main_prompt).strip())
    return prompts


# --- crops --------------------------------------------------------------------------------------
def _floor_multiple(value: float, multiple: int) -> int:
    return int(math.floor(value / multiple + 1e-9)) * multiple


def crop_side(face: Detection, image_w: int, image_h: int, padding: float = 0.5) -> int:
    """The side of a face's square crop: round(L * (1 + 2 * padding)), at least 1, at most the
    image's short side."""
    x1, y1, x2, y2 = _clipped(face.box, image_w, image_h)
    long_side = max(x2 - x1, y2 - y1, 1.0)
    return int(min(max(1, round(long_side * (1.0 + 2.0 * padding))), image_w, image_h))


def plan_crops(faces: Sequence[Detection], image_w: int, image_h: int, padding: float = 0.5, size: int = 1024,
               max_magnification: float = 4.0, multiple: int = 8) -> CropPlan:
    """One square crop per face, centred on its box and shifted inside the image, and the common
    detailing size S (definitions in the module docstring). No faces: S = floor_m(size)."""
    if multiple <= 0 or multiple % 8:
        raise ValueError(f"multiple must be a positive multiple of 8, not {multiple}")
    if size < multiple:
        raise ValueError(f"size {size} is below the multiple {multiple}")
    sides = [crop_side(face, image_w, image_h, padding) for face in faces]
    cap = _floor_multiple(size, multiple)
    if sides:
        cap = min(cap, _floor_multiple(max(sides) * max_magnification, multiple))
    detail = max(multiple, cap)
    # One batch means one S for every face: a crop smaller than S / max_magnification takes more
    # context around its face instead of being magnified past the cap (up to the image's short side).
    floor_side = min(math.ceil(detail / max_magnification), image_w, image_h)
    boxes = []
    for face, side in zip(faces, sides):
        side = max(side, floor_side)
        x1, y1, x2, y2 = _clipped(face.box, image_w, image_h)
        cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        left = min(max(int(round(cx - side / 2.0)), 0), image_w - side)
        top = min(max(int(round(cy - side / 2.0)), 0), image_h - side)
        boxes.append((left, top, left + side, top + side))
    return CropPlan(boxes=boxes, size=detail)


def magnification(plan: CropPlan) -> list[float]:
    """Each crop's scale factor into the detailing size: S / min(crop height, crop width) (> 1:
    upscaled, < 1: downscaled)."""
    return [plan.size / max(1, min(h, w)) for h, w in plan.shapes]


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [h, w, 3] → [height, width, 3] with PIL's LANCZOS (antialiased when shrinking)."""
    if pixels.shape[1] == width and pixels.shape[0] == height:
        return np.array(pixels)
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height), Image.LANCZOS))


def crop_and_resize(image: np.ndarray, plan: CropPlan) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [n, S, S, 3]: each crop of the plan resized (LANCZOS) to S x S."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    size = plan.size
    out = np.empty((len(plan.boxes), size, size, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(plan.boxes):
        out[i] = _resize(image[y1:y2, x1:x2], size, size)
    return out


# --- masks --------------------------------------------------------------------------------------
def _ellipse(height: int, width: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """bool [height, width]: pixel centres inside the ellipse inscribed in box (crop coords)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    a, b = max((x2 - x1) / 2.0, 0.5), max((y2 - y1) / 2.0, 0.5)
    ys = (np.arange(height, dtype=np.float64) + 0.5 - cy) / b
    xs = (np.arange(width, dtype=np.float64) + 0.5 - cx) / a
    return xs[None, :] ** 2 + ys[:, None] ** 2 <= 1.0


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull (Andrew's monotone chain), counter-clockwise in x-right / y-down axes read as
    maths axes; collinear points dropped."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, np.float64).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], np.float64)


def landmark_polygon(landmarks: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
    """The landmarks' convex hull scaled about its vertex centroid by the largest factor that
    keeps its bounding box inside `box` (same coordinates); None when it is degenerate."""
    points = np.asarray(landmarks, np.float64).reshape(-1, 2)
    if len(points) < 3 or not np.isfinite(points).all():
        return None
    hull = _hull(points)
    if len(hull) < 3:
        return None
    x1, y1, x2, y2 = box
    centre = hull.mean(axis=0)
    low, high = hull.min(axis=0) - centre, hull.max(axis=0) - centre
    limits = []
    for extent, room in ((-low[0], centre[0] - x1), (high[0], x2 - centre[0]),
                         (-low[1], centre[1] - y1), (high[1], y2 - centre[1])):
        if extent > 1e-6:
            limits.append(room / extent)
    if not limits or min(limits) <= 0:
        return None
    scaled = centre + (hull - centre) * min(limits)
    area = 0.5 * abs(np.dot(scaled[:, 0], np.roll(scaled[:, 1], -1)) - np.dot(scaled[:, 1], np.roll(scaled[:, 0], -1)))
    return scaled if area >= 1.0 else None


def _polygon(height: int, width: int, polygon: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """bool [height, width]: pixel centres inside the convex polygon and the box."""
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    inside = (xs >= box[0]) & (xs <= box[2]) & (ys >= box[1]) & (ys <= box[3])
    for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0)):
        # _hull is counter-clockwise in (x, y) maths orientation: the inside is left of each edge.
        inside &= (bx - ax) * (ys - ay) - (by - ay) * (xs - ax) >= -1e-9
    return inside


def _soften(binary: np.ndarray, dilate: int, blur: float) -> np.ndarray:
    mask = binary.astype(np.uint8)
    if dilate:
        radius = abs(int(dilate))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.dilate(mask, kernel) if dilate > 0 else cv2.erode(mask, kernel, borderType=cv2.BORDER_REPLICATE)
    soft = mask.astype(np.float32)
    if blur > 0:
        ksize = 2 * int(math.ceil(3.0 * blur)) + 1
        soft = cv2.GaussianBlur(soft, (ksize, ksize), sigmaX=float(blur), sigmaY=float(blur),
                                borderType=cv2.BORDER_REPLICATE)
    return _snap(soft)


def _snap(mask: np.ndarray) -> np.ndarray:
    mask = np.clip(mask, 0.0, 1.0).astype(np.float32)
    mask[mask < EPSILON] = 0.0
    mask[mask > 1.0 - EPSILON] = 1.0
    return mask


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.astype(np.float32, copy=True)
    shrinking = width < mask.shape[1] or height < mask.shape[0]
    resized = cv2.resize(mask.astype(np.float32), (width, height),
                         interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return _snap(resized)


def face_masks(faces: Sequence[Detection], plan: CropPlan, shape: str = "ellipse", dilate: int = 4,
               blur: float = 4.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Soft masks, one per face of the plan (faces[i] ↔ plan.boxes[i]).

    Returns (masks_detail float32 [n, S, S], masks_crop [float32 [h_i, w_i]]), values in [0, 1],
    1 = change. Built at each crop's own resolution (shape, dilate/erode, blur: module docstring)
    and resized to S x S for the detail masks (re-snapped: < 1/255 → 0, > 1 - 1/255 → 1)."""
    if shape not in MASK_SHAPES:
        raise ValueError(f"mask shape must be one of {MASK_SHAPES}, not {shape!r}")
    if len(faces) != len(plan.boxes):
        raise ValueError(f"{len(faces)} faces for {len(plan.boxes)} crops")
    size = plan.size
    detail = np.zeros((len(faces), size, size), np.float32)
    crops: list[np.ndarray] = []
    for i, (face, (cx1, cy1, cx2, cy2)) in enumerate(zip(faces, plan.boxes)):
        height, width = cy2 - cy1, cx2 - cx1
        x1, y1, x2, y2 = (float(v) for v in face.box)
        box = (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)
        polygon = None
        if shape == "landmarks":
            points = np.asarray(face.landmarks, np.float64).reshape(-1, 2) - np.array([cx1, cy1], np.float64)
            polygon = landmark_polygon(points, box)
        binary = _ellipse(height, width, box) if polygon is None else _polygon(height, width, polygon, box)
        mask = _soften(binary, dilate, blur)
        crops.append(mask)
        detail[i] = _resize_mask(mask, size, size)
    return detail, crops


def mask_png(mask: np.ndarray) -> bytes:
    """A float mask in [0, 1] as an 8-bit grey PNG."""
    grey = np.clip(np.rint(np.asarray(mask, np.float64) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# --- colour and compositing ---------------------------------------------------------------------
def _lab(pixels: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(pixels.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _rgb(lab: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB) * 255.0


def color_match(detailed: np.ndarray, original: np.ndarray, weight: np.ndarray | None = None,
                match_std: bool = True) -> np.ndarray:
    """The detailed crop with its per-channel CIELAB mean (and spread, the ratio clipped to
    [0.5, 2]) matched to the original's, both measured under `weight` (float [h, w], e.g. the soft
    mask; None: uniform). The correction is applied as an RGB delta, so an image matched to itself
    comes back exactly. uint8 [h, w, 3] in and out."""
    detailed, original = np.asarray(detailed), np.asarray(original)
    if detailed.shape != original.shape or detailed.dtype != np.uint8 or detailed.ndim != 3:
        raise ValueError(f"expected two uint8 [h, w, 3] of one shape, got {detailed.shape} and {original.shape}")
    w = np.ones(detailed.shape[:2], np.float64) if weight is None else np.asarray(weight, np.float64)
    if w.shape != detailed.shape[:2]:
        raise ValueError(f"weight {w.shape} for an image of {detailed.shape[:2]}")
    total = w.sum()
    if total <= 1e-6 or np.array_equal(detailed, original):
        return np.array(detailed)
    lab_d, lab_o = _lab(detailed).astype(np.float64), _lab(original).astype(np.float64)
    flat = w[..., None] / total
    mean_d, mean_o = (lab_d * flat).sum(axis=(0, 1)), (lab_o * flat).sum(axis=(0, 1))
    ratio = np.ones(3)
    if match_std:
        std_d = np.sqrt((((lab_d - mean_d) ** 2) * flat).sum(axis=(0, 1)))
        std_o = np.sqrt((((lab_o - mean_o) ** 2) * flat).sum(axis=(0, 1)))
        ratio = np.where(std_d > 1e-3, np.clip(std_o / np.maximum(std_d, 1e-3), *STD_RATIO_RANGE), 1.0)
    matched = lab_d + (lab_d - mean_d) * (ratio - 1.0) + (mean_o - mean_d)
    delta = _rgb(matched) - _rgb(lab_d)
    return np.clip(np.rint(detailed.astype(np.float64) + delta), 0, 255).astype(np.uint8)


def composite(base: np.ndarray, detailed_crops: Sequence[np.ndarray | None], plan: CropPlan,
              masks_crop: Sequence[np.ndarray], color_match: bool = True) -> np.ndarray:
    """The base with each detailed crop (uint8 [S, S, 3], or None: skipped) pasted back.

    Each crop is resized (LANCZOS) to its crop box, optionally colour-matched to the base's pixels
    there (weighted by its mask), and blended: out = cur * (1 - m) + detail * m in float, rounded,
    only where m > 0. Faces go in the given order, each over the result so far. Pixels where every
    mask is 0 are the base's exactly. Returns a new uint8 [H, W, 3]; the base is not modified."""
    base = np.asarray(base)
    if base.dtype != np.uint8 or base.ndim != 3 or base.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] base, got {base.dtype} {base.shape}")
    if not (len(detailed_crops) == len(plan.boxes) == len(masks_crop)):
        raise ValueError(f"{len(detailed_crops)} crops, {len(plan.boxes)} boxes and {len(masks_crop)} masks")
    out = np.array(base)
    for crop, (x1, y1, x2, y2), mask in zip(detailed_crops, plan.boxes, masks_crop):
        if crop is None:
            continue
        crop = np.asarray(crop)
        if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
            raise ValueError(f"expected uint8 [S, S, 3] detailed crops, got {crop.dtype} {crop.shape}")
        height, width = y2 - y1, x2 - x1
        m = np.asarray(mask, np.float32)
        if m.shape != (height, width):
            m = _resize_mask(m, width, height)
        if not (m > 0).any():
            continue
        detail = _resize(crop, width, height)
        if color_match:
            detail = _color_match(detail, base[y1:y2, x1:x2], m)
        region = out[y1:y2, x1:x2]
        weight = m[..., None].astype(np.float64)
        blended = np.clip(np.rint(region * (1.0 - weight) + detail * weight), 0, 255).astype(np.uint8)
        out[y1:y2, x1:x2] = np.where(weight > 0, blended, region)
    return out


_color_match = color_match  # composite's parameter of the same name shadows it


# --- pictures for reports and demos -------------------------------------------------------------
PALETTE = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 80, 255), (0, 220, 220),
           (255, 128, 0), (255, 96, 180))


def draw_overlay(image: np.ndarray, faces: Sequence[Detection], plan: CropPlan | None = None,
                 masks_crop: Sequence[np.ndarray] | None = None, alpha: float = 0.45) -> np.ndarray:
    """A copy of the image with each face's mask tinted in (alpha x mask), its face box, its crop
    box (thin) and its index (reading order) drawn; faces[i] ↔ plan.boxes[i] ↔ masks_crop[i]."""
    out = np.array(image, dtype=np.uint8)
    boxes = plan.boxes if plan is not None else [None] * len(faces)
    masks = masks_crop if masks_crop is not None else [None] * len(faces)
    thickness = max(1, round(min(out.shape[:2]) / 300))
    for i, (face, crop, mask) in enumerate(zip(faces, boxes, masks)):
        colour = PALETTE[i % len(PALETTE)]
        if crop is not None and mask is not None:
            x1, y1, x2, y2 = crop
            weight = np.asarray(mask, np.float64)[..., None] * alpha
            region = out[y1:y2, x1:x2].astype(np.float64)
            out[y1:y2, x1:x2] = np.clip(np.rint(region * (1 - weight) + np.array(colour) * weight), 0, 255)
        if crop is not None:
            x1, y1, x2, y2 = crop
            cv2.rectangle(out, (x1, y1), (x2 - 1, y2 - 1), (255, 255, 255), max(1, thickness // 2))
        fx1, fy1, fx2, fy2 = (int(round(v)) for v in face.box)
        cv2.rectangle(out, (fx1, fy1), (fx2, fy2), colour, thickness)
        for x, y in np.asarray(face.landmarks, np.float64).reshape(-1, 2):
            cv2.circle(out, (int(round(x)), int(round(y))), thickness + 1, colour, -1)
        cv2.putText(out, str(i), (fx1 + 2, max(fy1 - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness + 0.2,
                    colour, thickness, cv2.LINE_AA)
    return out


def side_by_side(images: Sequence[np.ndarray], gap: int = 8, background: int = 255) -> np.ndarray:
    """uint8 [H_i, W_i, 3] images left to right, `gap` pixels apart, shorter ones padded below
    with `background`."""
    if not images:
        raise ValueError("no images")
    height = max(image.shape[0] for image in images)
    width = sum(image.shape[1] for image in images) + gap * (len(images) - 1)
    out = np.full((height, width, 3), background, np.uint8)
    x = 0
    for image in images:
        image = np.asarray(image, np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out[:image.shape[0], x:x + image.shape[1]] = image
        x += image.shape[1] + gap
    return out
