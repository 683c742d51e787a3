"""Face detailing geometry: selection, prompts, crops, masks, colour matching, compositing."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.orchestrator import face_detailing as g
from services.orchestrator.face_detailing import CropPlan, Detection


def face(x1, y1, x2, y2, score=0.9) -> Detection:
    """A face box with plausible insightface landmarks (eyes at 40 %, nose 58 %, mouth 75 %)."""
    w, h = x2 - x1, y2 - y1
    lm = np.array([[x1 + 0.33 * w, y1 + 0.40 * h], [x1 + 0.67 * w, y1 + 0.40 * h], [x1 + 0.5 * w, y1 + 0.58 * h],
                   [x1 + 0.37 * w, y1 + 0.75 * h], [x1 + 0.63 * w, y1 + 0.75 * h]], np.float32)
    return Detection(box=(float(x1), float(y1), float(x2), float(y2)), landmarks=lm, score=score)


def random_image(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- selection ----------------------------------------------------------------------------------
def test_reading_order_is_row_major_whatever_the_detection_order():
    grid = [face(40 + 120 * c + 7 * r, 50 + 150 * r + (9 if c == 1 else -6 * c), 40 + 120 * c + 7 * r + 80,
                 50 + 150 * r + (9 if c == 1 else -6 * c) + 100, score=0.5 + 0.01 * (3 * r + c))
            for r in range(2) for c in range(3)]
    shuffled = [grid[i] for i in (4, 0, 5, 2, 3, 1)]
    kept = g.select_faces(shuffled, 480, 400)
    assert kept == grid
    assert kept.found == 6


def test_a_diagonal_does_not_chain_into_one_row():
    staircase = [face(100 * i, 40 * i, 100 * i + 80, 40 * i + 100) for i in range(4)]  # 0.4 face apart
    ordered = g.reading_order(list(reversed(staircase)))
    assert ordered == staircase


def test_filters_confidence_ratios_and_k_largest():
    image_w, image_h = 1000, 1000
    tiny = face(10, 10, 30, 30)                   # ratio 0.0004
    small = face(100, 500, 200, 600)              # 0.01
    large = face(500, 100, 800, 400)              # 0.09
    medium = face(300, 100, 450, 250)             # 0.0225
    weak = face(600, 600, 900, 900, score=0.2)    # large but below confidence
    faces = [tiny, small, large, medium, weak]
    # Rows (half the median height, 62.5 px): tiny (centre y 20); medium (175); large (250); small (550).
    assert g.select_faces(faces, image_w, image_h) == [tiny, medium, large, small]
    assert g.select_faces(faces, image_w, image_h, confidence=0.1)[-1] is weak
    assert g.select_faces(faces, image_w, image_h, min_ratio=0.005) == [medium, large, small]
    assert g.select_faces(faces, image_w, image_h, max_ratio=0.05) == [tiny, medium, small]
    top2 = g.select_faces(faces, image_w, image_h, max_faces=2)
    assert top2 == [medium, large] and top2.found == 5
    assert g.select_faces([], image_w, image_h) == [] and g.select_faces([], 10, 10).found == 0


# --- prompts ------------------------------------------------------------------------------------
def test_face_prompts_follow_adetailer():
    main = "a photo of two friends"
    assert g.split_face_prompts("", main, 3) == [main] * 3
    assert g.split_face_prompts("smiling woman [SEP] [SKIP] [SEP] old man, [PROMPT]", main, 5) == [
        "smiling woman", None, f"old man, {main}", f"old man, {main}", f"old man, {main}"]
    assert g.split_face_prompts(" [SEP]  freckles ", main, 3) == [main, "freckles", "freckles"]
    assert g.split_face_prompts("[PROMPT]", main, 1) == [main]
    assert g.split_face_prompts("[SKIP] me", main, 1) == ["[SKIP] me"]  # only a whole segment skips
    assert g.split_face_prompts("a [SEP] b [SEP] c", main, 2) == ["a", "b"]
    assert g.split_face_prompts("a", main, 0) == []


# --- crops --------------------------------------------------------------------------------------
def test_crops_are_square_inside_the_image_and_centred_when_they_can_be():
    image_w, image_h = 640, 480
    faces = [face(300, 200, 360, 280), face(0, 0, 50, 60), face(600, 420, 640, 480), face(100, 20, 500, 470)]
    plan = g.plan_crops(faces, image_w, image_h, padding=0.5, size=1024)
    for x1, y1, x2, y2 in plan.boxes:
        assert 0 <= x1 < x2 <= image_w and 0 <= y1 < y2 <= image_h
        assert x2 - x1 == y2 - y1
    # S = 1024 (the 480 crop x 4): a crop under S / 4 = 256 takes more context instead of more zoom.
    assert plan.size == 1024
    assert plan.boxes[0] == (202, 112, 458, 368)           # 80 x (1 + 2 x 0.5) = 160 -> 256, centred
    assert plan.boxes[1] == (0, 0, 256, 256)               # shifted in, not shrunk
    alone = g.plan_crops(faces[:1], image_w, image_h, padding=0.5, size=1024)
    assert alone.boxes[0] == (250, 160, 410, 320)          # alone: long side 80 x (1 + 2 x 0.5), centred
    assert plan.boxes[3][3] - plan.boxes[3][1] == 480      # the largest square that fits
    assert plan.size % 8 == 0 and 8 <= plan.size <= 1024


def test_detailing_size_is_capped_by_size_and_magnification():
    tiny = g.plan_crops([face(100, 100, 110, 112)], 512, 512, padding=0.5, size=1024, max_magnification=4.0)
    side = tiny.boxes[0][2] - tiny.boxes[0][0]
    assert side == 24 and tiny.size == 96                  # never upscaled beyond 4x
    assert g.magnification(tiny) == [4.0]
    big = g.plan_crops([face(0, 0, 400, 400)], 1000, 1000, size=1024)
    assert big.size == 1024                                # 800 x 4 capped at size
    odd = g.plan_crops([face(100, 100, 117, 117)], 512, 512, padding=0.5, size=1000, max_magnification=3.0)
    assert odd.size == 96 and odd.size % 8 == 0            # 34 x 3 = 102, down to a multiple of 8
    assert g.plan_crops([face(0, 0, 1, 1)], 64, 64, max_magnification=1.0).size == 8  # at least the multiple
    assert g.plan_crops([face(0, 0, 100, 100)], 1000, 1000, size=512, multiple=64).size == 512
    mixed = g.plan_crops([face(0, 0, 10, 10), face(500, 500, 600, 600)], 1000, 1000, size=1024)
    # One S for the batch: the small face's crop grows to S / 4 = 200, so neither is magnified past 4x.
    assert mixed.size == 800 and g.magnification(mixed) == [4.0, 4.0]
    empty = g.plan_crops([], 100, 100, size=1020)
    assert empty.boxes == [] and empty.size == 1016


def test_crop_and_resize_gives_one_batch_at_the_detailing_size():
    image = random_image(300, 400)
    plan = g.plan_crops([face(50, 50, 100, 110), face(250, 100, 330, 200)], 400, 300, size=256)
    crops = g.crop_and_resize(image, plan)
    assert crops.shape == (2, plan.size, plan.size, 3) and crops.dtype == np.uint8
    flat = np.zeros((300, 400, 3), np.uint8)
    flat[...] = (10, 200, 30)
    assert (g.crop_and_resize(flat, plan) == np.array([10, 200, 30], np.uint8)).all()
    exact = CropPlan(boxes=[(0, 0, 64, 64)], size=64)
    assert np.array_equal(g.crop_and_resize(image, exact)[0], image[:64, :64])
    assert g.crop_and_resize(image, CropPlan([], 64)).shape == (0, 64, 64, 3)


# --- masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["ellipse", "landmarks"])
def test_masks_are_soft_zero_at_the_crop_border_and_one_at_the_face_centre(shape):
    faces = [face(200, 150, 280, 250), face(40, 40, 140, 160)]
    plan = g.plan_crops(faces, 640, 480, padding=0.5, size=512)
    detail, crops = g.face_masks(faces, plan, shape=shape, dilate=4, blur=4.0)
    assert detail.shape == (2, plan.size, plan.size) and detail.dtype == np.float32
    for m, (x1, y1, x2, y2), f in zip(crops, plan.boxes, faces):
        assert m.shape == (y2 - y1, x2 - x1) and m.dtype == np.float32
        assert m.min() == 0.0 and m.max() == 1.0
        border = np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]])
        assert (border == 0).all()
        cx, cy = f.center
        assert m[int(cy) - y1, int(cx) - x1] == 1.0
        assert 0 < ((m > 0) & (m < 1)).sum()                # feathered
        values = np.unique(m)
        assert values[1] >= 1 / 255 and values[-2] <= 1 - 1 / 255   # no near-invisible tails
    assert ((detail >= 0) & (detail <= 1)).all()
    assert (detail[:, 0, :] == 0).all()
    for m, (x1, y1, x2, y2), f in zip(detail, plan.boxes, faces):
        cx, cy = f.center
        scale = plan.size / (x2 - x1)
        assert m[int((cy - y1) * scale), int((cx - x1) * scale)] == 1.0


def test_dilate_grows_and_erode_shrinks_the_mask():
    faces = [face(200, 150, 280, 250)]
    plan = g.plan_crops(faces, 640, 480, padding=1.0)
    areas = {d: (g.face_masks(faces, plan, dilate=d, blur=0.0)[1][0] > 0).sum() for d in (-6, 0, 6)}
    assert areas[-6] < areas[0] < areas[6]
    sharp = g.face_masks(faces, plan, dilate=0, blur=0.0)[1][0]
    assert set(np.unique(sharp).tolist()) == {0.0, 1.0}
    # An ellipse of semi-axes 40 x 50 px: area ~ pi a b.
    assert abs(areas[0] - np.pi * 40 * 50) < 0.02 * np.pi * 40 * 50


def test_landmark_mask_reaches_the_box_but_stays_inside_it():
    f = face(200, 150, 280, 250)
    plan = g.plan_crops([f], 640, 480, padding=0.5)
    lm = g.face_masks([f], plan, shape="landmarks", dilate=0, blur=0.0)[1][0]
    el = g.face_masks([f], plan, shape="ellipse", dilate=0, blur=0.0)[1][0]
    x1, y1 = plan.boxes[0][:2]
    ys, xs = np.nonzero(lm)
    assert xs.min() + x1 >= 200 and xs.max() + x1 < 280 and ys.min() + y1 >= 150 and ys.max() + y1 < 250
    touches = [xs.min() + x1 - 200, 279 - (xs.max() + x1), ys.min() + y1 - 150, 249 - (ys.max() + y1)]
    assert min(touches) <= 1
    assert lm.sum() > 0.5 * el.sum()
    polygon = g.landmark_polygon(f.landmarks, f.box)
    assert polygon is not None and len(polygon) >= 3
    # Missing or collinear landmarks fall back to the ellipse.
    bare = Detection(box=f.box, landmarks=np.zeros((0, 2), np.float32), score=0.9)
    line = Detection(box=f.box, landmarks=np.array([[210, 200], [240, 200], [270, 200]], np.float32), score=0.9)
    for other in (bare, line):
        assert np.array_equal(g.face_masks([other], plan, shape="landmarks", dilate=0, blur=0.0)[1][0], el)


def test_mask_png_is_an_8_bit_grey_png():
    m = np.zeros((20, 30), np.float32)
    m[5:10, 5:10] = 1.0
    m[0, 0] = 0.5
    png = Image.open(io.BytesIO(g.mask_png(m)))
    assert png.mode == "L" and png.size == (30, 20)
    grey = np.asarray(png)
    assert grey[7, 7] == 255 and grey[0, 0] == 128 and grey[15, 15] == 0


# --- colour matching and compositing ------------------------------------------------------------
def test_color_match_of_an_image_to_itself_is_the_identity():
    image = random_image(64, 48, seed=3)
    weight = np.random.default_rng(1).random((64, 48)).astype(np.float32)
    assert np.array_equal(g.color_match(image, image, weight), image)
    assert np.array_equal(g.color_match(image, image.copy(), None), image)


def test_color_match_removes_a_colour_shift():
    original = np.clip(random_image(64, 64, seed=4).astype(np.int16) // 2 + 60, 0, 255).astype(np.uint8)
    shifted = np.clip(original.astype(np.int16) + np.array([25, -15, 10]), 0, 255).astype(np.uint8)
    matched = g.color_match(shifted, original, np.ones((64, 64), np.float32))
    before = np.abs(shifted.astype(float).mean((0, 1)) - original.astype(float).mean((0, 1))).max()
    after = np.abs(matched.astype(float).mean((0, 1)) - original.astype(float).mean((0, 1))).max()
    assert before > 10 and after < 2.5  # LAB means, not RGB ones: close, not exact


def _setup(seed=0):
    base = random_image(240, 320, seed)
    faces = [face(40, 40, 100, 110), face(200, 60, 260, 130), face(120, 150, 170, 210)]
    plan = g.plan_crops(faces, 320, 240, padding=0.5, size=256)
    _, masks = g.face_masks(faces, plan)
    detailed = list(np.random.default_rng(seed + 1).integers(0, 256, (3, plan.size, plan.size, 3), dtype=np.uint8))
    return base, faces, plan, masks, detailed


@pytest.mark.parametrize("match", [True, False])
def test_pixels_outside_every_mask_are_the_base_exactly(match):
    base, _, plan, masks, detailed = _setup()
    before = base.copy()
    out = g.composite(base, detailed, plan, masks, color_match=match)
    assert np.array_equal(base, before)                    # the base is not modified
    union = np.zeros(base.shape[:2], bool)
    for (x1, y1, x2, y2), m in zip(plan.boxes, masks):
        union[y1:y2, x1:x2] |= m > 0
    assert np.array_equal(out[~union], base[~union])
    for (x1, y1, x2, y2), m in zip(plan.boxes, masks):    # and every face changed
        core = m == 1
        assert (out[y1:y2, x1:x2][core] != base[y1:y2, x1:x2][core]).any(axis=-1).mean() > 0.9


def test_full_weight_pixels_take_the_detail_and_zero_masks_return_the_base():
    base, _, plan, masks, detailed = _setup(seed=5)
    zeros = [np.zeros_like(m) for m in masks]
    assert np.array_equal(g.composite(base, detailed, plan, zeros), base)
    assert np.array_equal(g.composite(base, [None, None, None], plan, masks), base)
    one = CropPlan(boxes=[plan.boxes[0]], size=plan.size)
    out = g.composite(base, [detailed[0]], one, [masks[0]], color_match=False)
    x1, y1, x2, y2 = plan.boxes[0]
    resized = np.asarray(Image.fromarray(detailed[0]).resize((x2 - x1, y2 - y1), Image.LANCZOS))
    core = masks[0] == 1
    assert np.array_equal(out[y1:y2, x1:x2][core], resized[core])


def test_skipped_faces_are_left_alone():
    base, _, plan, masks, detailed = _setup(seed=7)
    out = g.composite(base, [detailed[0], None, detailed[2]], plan, masks, color_match=False)
    x1, y1, x2, y2 = plan.boxes[1]
    others = np.zeros(base.shape[:2], bool)
    for i in (0, 2):
        a1, b1, a2, b2 = plan.boxes[i]
        others[b1:b2, a1:a2] |= masks[i] > 0
    alone = ~others[y1:y2, x1:x2]
    assert np.array_equal(out[y1:y2, x1:x2][alone], base[y1:y2, x1:x2][alone])


def test_overlay_and_side_by_side():
    base, faces, plan, masks, _ = _setup()
    overlay = g.draw_overlay(base, faces, plan, masks)
    assert overlay.shape == base.shape and overlay.dtype == np.uint8 and not np.array_equal(overlay, base)
    small = random_image(100, 50)
    both = g.side_by_side([base, small], gap=8)
    assert both.shape == (240, 320 + 8 + 50, 3)
    assert np.array_equal(both[:, :320], base) and np.array_equal(both[:100, 328:], small)
    assert (both[100:, 328:] == 255).all() and (both[:, 320:328] == 255).all()
