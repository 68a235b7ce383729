"""The .bin reader (safety and validation), image folders, preprocessing and calibration readers."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.bins import ImageFolder, VerificationBin, open_images, read_bin, write_bin
from pipeline.data.calibration import CalibrationData, calibration_indices
from pipeline.data.preprocess import preprocess
from pipeline.core.errors import UserError
from pipeline.recipe import InputSpec
from tests.synthdata import face_images, malicious_pickle, python2_bin_pickle, synthetic_bin, synthetic_pairs


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    return buf.tobytes()


def _solid(bgr: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.full((*size, 3), bgr, dtype=np.uint8)


@pytest.fixture
def small_bin(tmp_path: Path) -> Path:
    return synthetic_bin(tmp_path / "small.bin", pairs=6)


# --- reading -------------------------------------------------------------------


def test_write_then_read_gives_the_same_pairs_and_lazy_images(tmp_path: Path) -> None:
    images, issame = synthetic_pairs(5)
    path = write_bin(tmp_path / "a.bin", images, issame)
    vb = read_bin(path)
    assert isinstance(vb, VerificationBin)
    assert vb.num_pairs == 5 and vb.num_images == 10
    assert vb.issame.dtype == np.bool_ and vb.issame.tolist() == issame
    assert vb.image_size == (32, 32)
    assert vb.encoded(3) == images[3]
    assert len(vb.sha256()) == 64


def test_decode_returns_rgb_from_opencv_bgr_encoding(tmp_path: Path) -> None:
    red_bgr = _solid((0, 0, 255))  # OpenCV order: pure red
    blue_bgr = _solid((255, 0, 0))
    vb = read_bin(write_bin(tmp_path / "c.bin", [_png(red_bgr), _png(blue_bgr)], [False]))
    assert vb.decode(0)[0, 0].tolist() == [255, 0, 0]
    assert vb.decode(1)[0, 0].tolist() == [0, 0, 255]
    many = vb.decode_many([1, 0])
    assert many.shape == (2, 8, 8, 3) and many.dtype == np.uint8
    assert many[0, 0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("protocol", range(0, pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("labels", ["list", "numpy"])
def test_reads_every_pickle_protocol_with_list_or_numpy_labels(tmp_path: Path, protocol: int, labels: str) -> None:
    images, issame = synthetic_pairs(3)
    lab = np.array(issame) if labels == "numpy" else issame
    path = tmp_path / "p.bin"
    path.write_bytes(pickle.dumps((images, lab), protocol=protocol))
    vb = read_bin(path)
    assert vb.issame.tolist() == issame
    assert vb.encoded(5) == images[5]


@pytest.mark.parametrize("numpy_labels", [True, False])
def test_reads_python2_pickles(tmp_path: Path, numpy_labels: bool) -> None:
    images, issame = synthetic_pairs(3)
    data = python2_bin_pickle(images, issame, numpy_labels=numpy_labels)
    # The hand-written stream must be one that numpy's own unpickling accepts too.
    assert list(pickle.loads(data, encoding="bytes")[1]) == issame
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    vb = read_bin(path)
    assert vb.issame.tolist() == issame
    assert vb.decode(0).shape == (32, 32, 3)


def test_reads_the_labels_as_ints_zero_and_one(tmp_path: Path) -> None:
    images, _ = synthetic_pairs(2)
    path = tmp_path / "ints.bin"
    path.write_bytes(pickle.dumps((images, [1, 0])))
    assert read_bin(path).issame.tolist() == [True, False]


# --- security ------------------------------------------------------------------


@pytest.mark.parametrize("via", ["os.system", "open", "numpy"])
def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path, via: str) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(malicious_pickle(target, via=via))
    with pytest.raises(UserError, match=r"refused to load (posix|nt|os)\.system|refused to load (io|builtins)\.open|refused to load numpy\.save") as e:
        read_bin(path)
    assert str(path) in str(e.value)
    assert not target.exists() and not Path(str(target) + ".npy").exists()


def test_numpy_arrays_other_than_bool_are_refused(tmp_path: Path) -> None:
    images, _ = synthetic_pairs(2)
    path = tmp_path / "ints.bin"
    path.write_bytes(pickle.dumps((images, np.array([1, 0], dtype=np.int64))))
    with pytest.raises(UserError, match="refused numpy dtype 'i8'"):
        read_bin(path)
    path.write_bytes(pickle.dumps((images, np.array([True, False], dtype=object))))
    with pytest.raises(UserError, match="refused numpy dtype 'O8'"):
        read_bin(path)


def test_a_global_hidden_in_a_python2_style_stream_is_refused(tmp_path: Path) -> None:
    # GLOBAL opcode for subprocess.call inside an otherwise valid protocol-2 stream.
    images, issame = synthetic_pairs(1)
    stream = python2_bin_pickle(images, issame).replace(b"cnumpy\ndtype\n", b"csubprocess\ncall\n")
    path = tmp_path / "evil2.bin"
    path.write_bytes(stream)
    with pytest.raises(UserError, match=r"refused to load subprocess\.call"):
        read_bin(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_give_a_user_error_or_a_valid_bin(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.bin"
    path.write_bytes(data)
    try:
        read_bin(path)
    except UserError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=10_000))
def test_any_truncation_of_a_valid_bin_is_a_user_error(tmp_path: Path, cut: int) -> None:
    images, issame = synthetic_pairs(2)
    full = pickle.dumps((images, np.array(issame)), protocol=4)
    path = tmp_path / "cut.bin"
    path.write_bytes(full[: max(1, len(full) - cut)])
    with pytest.raises(UserError):
        read_bin(path)


# --- validation ----------------------------------------------------------------


def test_not_a_pickle_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "text.bin"
    path.write_text("name,issame\nalice,1\n")
    with pytest.raises(UserError, match="not a pickle"):
        read_bin(path)
    jpeg = tmp_path / "photo.bin"
    jpeg.write_bytes(face_images(1)[0])
    with pytest.raises(UserError, match="not a pickle"):
        read_bin(jpeg)


def test_truncated_file_is_named_as_truncated(tmp_path: Path, small_bin: Path) -> None:
    data = small_bin.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        read_bin(cut)


def test_missing_and_empty_files_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        read_bin(tmp_path / "absent.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_bin(tmp_path / "empty.bin")


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"images": [], "issame": []}, "wrong structure.*got dict"),
        (([b"x"], [True], [1]), "wrong structure.*length 3"),
        (("notalist", [True]), "first item must be a list"),
        (([b"a", 7], [True]), "image 1 is int"),
        (([b"a", b"b"], "yes"), "pair labels must be a list"),
        (([b"a", b"b"], [2]), "pair label 0 is int 2"),
        (([], []), "holds no images"),
    ],
)
def test_wrong_structure_says_what_is_wrong(tmp_path: Path, obj: object, message: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(UserError, match=message):
        read_bin(path)


def test_image_count_must_be_twice_the_pair_count(tmp_path: Path) -> None:
    images, issame = synthetic_pairs(3)
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps((images[:5], issame)))
    with pytest.raises(UserError, match="5 images for 3 pairs"):
        read_bin(path)


def test_an_entry_that_does_not_decode_is_named_by_index(tmp_path: Path) -> None:
    images, issame = synthetic_pairs(3)
    images[3] = b"\xff\xd8\xff garbage"
    path = write_bin(tmp_path / "corrupt.bin", images, issame)
    vb = read_bin(path)  # lazy: only the first image is decoded on open
    assert vb.decode(2).shape == (32, 32, 3)
    with pytest.raises(UserError, match="image 3 does not decode"):
        vb.decode(3)
    with pytest.raises(UserError, match="image 3 does not decode"):
        vb.validate()
    with pytest.raises(UserError, match="image 3 does not decode"):
        read_bin(path, validate=True)


def test_a_file_whose_first_image_is_not_an_image_fails_on_open(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "x.bin", [b"hello", b"world"], [True])
    with pytest.raises(UserError, match="image 0 does not decode"):
        read_bin(path)


def test_inconsistent_image_sizes_are_named(tmp_path: Path) -> None:
    images, issame = synthetic_pairs(3)
    images[5] = face_images(1, size=(40, 36))[0]
    path = write_bin(tmp_path / "sizes.bin", images, issame)
    vb = read_bin(path)
    with pytest.raises(UserError, match="image 5 is 40x36 but the first image is 32x32"):
        vb.decode_many([4, 5])
    with pytest.raises(UserError, match="image 5 is 40x36"):
        vb.validate()


def test_validate_decodes_in_bounded_chunks(small_bin: Path) -> None:
    vb = read_bin(small_bin)
    sizes = [len(idx) for idx, imgs in vb.iter_chunks(chunk=5)]
    assert sizes == [5, 5, 2]
    vb.validate(chunk=5)


# --- image folders ---------------------------------------------------------------


def test_image_folder_is_sorted_recursive_and_decodes_like_a_bin(tmp_path: Path) -> None:
    folder = tmp_path / "faces"
    (folder / "b").mkdir(parents=True)
    (folder / "a.png").write_bytes(_png(_solid((0, 0, 255))))
    (folder / "b" / "c.jpg").write_bytes(face_images(1, size=(8, 8))[0])
    (folder / "notes.txt").write_text("not an image")
    src = open_images(folder)
    assert isinstance(src, ImageFolder)
    assert [f.name for f in src.files] == ["a.png", "c.jpg"]
    assert src.num_images == 2 and src.image_size == (8, 8)
    assert src.decode(0)[0, 0].tolist() == [255, 0, 0]
    h1 = src.sha256()
    (folder / "a.png").write_bytes(_png(_solid((0, 255, 0))))
    assert ImageFolder(folder).sha256() != h1


def test_image_folder_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        ImageFolder(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(_png(_solid((1, 2, 3))))
    (bad / "z.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"image 1 \(z\.jpg\) does not decode"):
        ImageFolder(bad).validate()


def test_open_images_reads_a_bin_file(small_bin: Path) -> None:
    assert isinstance(open_images(small_bin), VerificationBin)


# --- preprocessing -----------------------------------------------------------------


def _ramp(n: int = 2, h: int = 4, w: int = 6) -> np.ndarray:
    return (np.arange(n * h * w * 3) % 251).astype(np.uint8).reshape(n, h, w, 3)


def test_preprocess_raw_rgb_is_pixels_as_float_nchw() -> None:
    imgs = _ramp()
    x = preprocess(imgs, InputSpec(size=[4, 6]))
    assert x.shape == (2, 3, 4, 6) and x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2).astype(np.float32))


def test_preprocess_bgr_and_flip_and_mean_std() -> None:
    imgs = _ramp()
    bgr = preprocess(imgs, InputSpec(size=[4, 6], channels="BGR"))
    np.testing.assert_array_equal(bgr[:, 0], imgs[..., 2].astype(np.float32))
    flipped = preprocess(imgs, InputSpec(size=[4, 6]), flip=True)
    np.testing.assert_array_equal(flipped[..., 0], imgs[:, :, -1, :].transpose(0, 2, 1).astype(np.float32))
    spec = InputSpec(size=[4, 6], scale="mean_std", mean=[10.0, 20.0, 30.0], std=[2.0, 4.0, 8.0])
    norm = preprocess(imgs, spec)
    np.testing.assert_allclose(norm[:, 2], (imgs[..., 2].astype(np.float32) - 30.0) / 8.0)


def test_preprocess_resizes_to_the_spec_size() -> None:
    x = preprocess(_ramp(h=8, w=8), InputSpec(size=[4, 5]))
    assert x.shape == (2, 3, 4, 5)


# --- calibration ------------------------------------------------------------------


def test_calibration_indices_are_seeded_distinct_and_sorted() -> None:
    a = calibration_indices(1000, 200, seed=0)
    assert a.tolist() == calibration_indices(1000, 200, seed=0).tolist()
    assert len(set(a.tolist())) == 200 and a.tolist() == sorted(a.tolist())
    assert a.min() >= 0 and a.max() < 1000
    assert a.tolist() != calibration_indices(1000, 200, seed=1).tolist()
    # Pinned: the choice must not drift with numpy versions, or calibration stops being reproducible.
    assert calibration_indices(12000, 5, seed=0).tolist() == PINNED_INDICES


PINNED_INDICES = [3237, 3693, 6132, 7641, 10204]


def test_calibration_indices_refuse_more_samples_than_images() -> None:
    with pytest.raises(UserError, match="calibration.samples is 50 but the calibration set holds only 12 images"):
        calibration_indices(12, 50, seed=0)


def test_calibration_data_batches_for_inc_and_ort(small_bin: Path) -> None:
    vb = read_bin(small_bin)
    spec = InputSpec(size=[32, 32])
    cd = CalibrationData(vb, spec, samples=5, seed=3, batch_size=2, input_name="data")
    assert cd.batch_size == 2 and len(cd) == 3 and cd.num_samples == 5
    batches = list(cd)
    assert [b[0]["data"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b[0]["data"].dtype == np.float32 and b[0]["data"].shape[1:] == (3, 32, 32) for b in batches)
    first = preprocess(vb.decode_many(cd.indices[:2]), spec)
    np.testing.assert_array_equal(batches[0][0]["data"], first)

    reader = cd.ort_reader("data")
    got = [reader.get_next() for _ in range(4)]
    assert got[3] is None
    np.testing.assert_array_equal(got[0]["data"], first)
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["data"], first)


def test_calibration_flip_adds_the_mirror_of_each_batch(small_bin: Path) -> None:
    vb = read_bin(small_bin)
    spec = InputSpec(size=[32, 32])
    cd = CalibrationData(vb, spec, samples=4, seed=0, batch_size=4, flip=True)
    arrays = list(cd.arrays())
    assert cd.num_samples == 8 and len(arrays) == 2 == len(cd)
    np.testing.assert_array_equal(arrays[1], arrays[0][..., ::-1])


def test_calibration_data_same_seed_same_images(small_bin: Path) -> None:
    vb = read_bin(small_bin)
    spec = InputSpec(size=[32, 32])
    a = CalibrationData(vb, spec, samples=6, seed=7)
    b = CalibrationData(vb, spec, samples=6, seed=7)
    assert a.indices_sha256 == b.indices_sha256
    assert a.indices_sha256 != CalibrationData(vb, spec, samples=6, seed=8).indices_sha256
