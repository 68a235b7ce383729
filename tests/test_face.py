"""MTCNN detection and five-point alignment (pipeline.photos.detect)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.photos.detect import (
    ARCFACE_TEMPLATE,
    MTCNN,
    NoFaceError,
    align,
    default_detector,
    detect_and_align,
    nms,
    pyramid_scales,
    read_rgb,
    select_face,
    similarity_transform,
    weight_paths,
)


def _write_jpg(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return np.array([[c, -s, tx], [s, c, ty]], dtype=np.float64)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    # x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty): its least-squares solution
    # is the Umeyama similarity that insightface's alignment (scikit-image) computes.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows, float), np.array(rhs, float), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


# --- the weights and the cascade's pieces ---------------------------------------------------------


def test_mtcnn_weights_are_found_through_the_installed_distribution():
    paths = weight_paths()
    assert set(paths) == {"pnet", "rnet", "onet"}
    for p in paths.values():
        assert p.is_file() and p.stat().st_size > 10_000


def test_nms_keeps_the_best_of_overlapping_boxes_and_every_disjoint_box():
    boxes = np.array([[1, 1, 10, 10], [2, 2, 11, 11], [50, 50, 60, 60], [1, 1, 30, 30]], float)
    scores = np.array([0.8, 0.9, 0.5, 0.7])
    keep = nms(boxes, scores, 0.5, "union")
    assert list(keep) == [1, 3, 2]  # box 0 overlaps box 1 (IoU 0.67) and goes; box 3 contains it but IoU is small
    # "min" divides by the smaller area: a box inside a bigger one is suppressed.
    assert list(nms(boxes, scores, 0.7, "min")) == [1, 2]
    assert nms(np.empty((0, 4)), np.empty(0), 0.5).size == 0


def test_pyramid_starts_at_the_minimum_face_and_stops_at_the_image_size():
    scales = pyramid_scales(250, 200, 20, 0.709)
    assert scales[0] == pytest.approx(12 / 20)
    assert all(b == pytest.approx(a * 0.709) for a, b in zip(scales, scales[1:]))
    assert 200 * scales[-1] >= 12 > 200 * scales[-1] * 0.709


# --- alignment ----------------------------------------------------------------------------------------


def test_similarity_transform_recovers_an_exact_similarity():
    m = _similarity(0.45, -17.0, 12.0, -30.0)
    inv = cv2.invertAffineTransform(m)
    src = _apply(inv, ARCFACE_TEMPLATE.astype(np.float64))
    got = similarity_transform(src)
    np.testing.assert_allclose(got, m, atol=1e-4)


def test_similarity_transform_is_the_least_squares_fit_over_all_five_landmarks():
    rng = np.random.default_rng(3)
    m = _similarity(0.5, 8.0, -20.0, 5.0)
    src = _apply(cv2.invertAffineTransform(m), ARCFACE_TEMPLATE.astype(np.float64))
    # One landmark far off (a badly placed mouth corner): a robust fit would ignore it, insightface's does not.
    noisy = src + rng.normal(0, 2.0, src.shape)
    noisy[4] += (15.0, -9.0)
    got = similarity_transform(noisy)
    np.testing.assert_allclose(got, _lstsq_similarity(noisy, ARCFACE_TEMPLATE), atol=2e-3)


def test_align_puts_the_landmarks_on_the_arcface_template():
    # The template rotated by 25 degrees, scaled by 2.8 and moved to the middle of a 420x420 image.
    to_image = _similarity(2.8, 25.0, 0.0, 0.0)
    landmarks = _apply(to_image, ARCFACE_TEMPLATE.astype(np.float64))
    landmarks += (210.0, 210.0) - landmarks.mean(axis=0)
    assert landmarks.min() > 10 and landmarks.max() < 410
    img = np.zeros((420, 420, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(img, (int(round(x)), int(round(y))), 4, (255, 255, 255), -1)
    crop = align(img, landmarks)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    for x, y in ARCFACE_TEMPLATE:
        assert crop[int(round(y)), int(round(x))].min() > 150, (x, y)
    # Everything else stays dark: the dots landed nowhere else.
    assert (crop.max(axis=2) > 150).mean() < 0.05


# --- files and user errors ----------------------------------------------------------------------------


def test_blank_image_is_a_no_face_error_naming_the_file(tmp_path):
    p = _write_jpg(tmp_path / "blank.jpg", np.full((240, 320, 3), 128, np.uint8))
    with pytest.raises(NoFaceError, match="no face found in .*blank.jpg"):
        detect_and_align(p)


def test_unreadable_image_is_a_user_error_naming_the_file(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    with pytest.raises(UserError, match="cannot decode image .*photo.jpg"):
        read_rgb(bad)
    with pytest.raises(UserError, match="image not found: .*missing.jpg"):
        detect_and_align(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty.png"):
        read_rgb(empty)


def test_unknown_selection_is_a_user_error():
    from pipeline.photos.detect import Face

    f = Face(box=(0, 0, 10, 10), score=1.0, landmarks=np.zeros((5, 2), np.float32))
    with pytest.raises(UserError, match="unknown face selection 'biggest'"):
        select_face([f], (100, 100, 3), "biggest")  # type: ignore[arg-type]


# --- real photos --------------------------------------------------------------------------------------


def _photo(shared_raw: Path, name: str, number: int) -> np.ndarray:
    return read_rgb(shared_raw / name / f"{name}_{number:04d}.jpg")


def test_real_photo_gives_one_face_with_landmarks_in_anatomical_order(shared_raw):
    faces = default_detector().detect(_photo(shared_raw, "Abel_Pacheco", 1))
    assert len(faces) == 1
    f = faces[0]
    assert f.score > 0.95
    (lex, ley), (rex, rey), (nx, ny), (lmx, lmy), (rmx, rmy) = f.landmarks
    assert lex < nx < rex and lmx < rmx
    assert max(ley, rey) < ny < min(lmy, rmy)
    left, top, right, bottom = f.box
    assert all(left <= x <= right and top <= y <= bottom for x, y in f.landmarks)
    # A 250x250 LFW photo is framed around a face of roughly 100-120 px.
    assert 80 < right - left < 150


def test_large_photo_is_detected_at_reduced_size_and_mapped_back(shared_raw):
    rgb = _photo(shared_raw, "Abel_Pacheco", 1)
    small = default_detector().detect(rgb)[0]
    big_rgb = cv2.resize(rgb, (2000, 2000), interpolation=cv2.INTER_CUBIC)
    big = MTCNN(max_side=1000).detect(big_rgb)
    assert len(big) == 1
    k = 2000 / 250
    np.testing.assert_allclose(big[0].landmarks / k, small.landmarks, atol=2.5)


def test_two_faces_are_chosen_by_size_or_by_distance_to_the_centre(shared_raw, tmp_path):
    # A large face near the left edge and a small one in the middle of the canvas.
    canvas = np.full((300, 700, 3), 90, np.uint8)
    canvas[25:275, 10:260] = _photo(shared_raw, "Abel_Pacheco", 1)
    small = cv2.resize(_photo(shared_raw, "Amber_Tamblyn", 1), (140, 140), interpolation=cv2.INTER_AREA)
    canvas[80:220, 280:420] = small
    path = _write_jpg(tmp_path / "two.jpg", canvas)

    largest = detect_and_align(path, select="largest")
    center = detect_and_align(path, select="center")
    assert largest.faces_found >= 2 and center.faces_found >= 2
    assert 10 < largest.face.center[0] < 260
    assert 280 < center.face.center[0] < 420
    assert largest.face.area > 2 * center.face.area
    # Each crop is its own person's face: it matches the crop of that photo alone.
    alone = detect_and_align(shared_raw / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg")
    diff_same = np.abs(largest.crop.astype(int) - alone.crop.astype(int)).mean()
    diff_other = np.abs(center.crop.astype(int) - alone.crop.astype(int)).mean()
    assert diff_same < 12 < diff_other
