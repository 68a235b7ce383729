"""embed, compare and pack-bin (pipeline.photos.embed, .compare, .pack): photos in, embeddings / verdicts / .bin out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.photos.compare import compare, cosine_to_distance, distance_to_cosine, threshold_from_report
from pipeline.photos.embed import FaceEmbedder, embed
from pipeline.photos.pack import draw_pairs, pack_bin, parse_pairs
from pipeline.cli.app import app
from pipeline.data.bins import read_bin
from pipeline.core.errors import UserError
from pipeline.core.files import sha256_file
from pipeline.eval.protocol import evaluate
from pipeline.recipe import GateSection, InputSpec, VerifySection

SPEC = InputSpec()  # raw RGB 112x112, as the shared MobileFaceNet takes it
# pairs.txt order: 50 same then 50 different pairs; in lfw.bin they are pairs 0-49 and 300-349.
LFW_BIN_PAIRS = np.r_[0:50, 300:350]


def _blank(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((200, 200, 3), 127, np.uint8))
    return path


def _synthetic_model(tmp_path: Path) -> Path:
    from synthdata import face_model

    p = tmp_path / "synthetic.onnx"
    face_model(p, size=(112, 112), embedding=16)
    return p


# --- thresholds ------------------------------------------------------------------------------------


def test_threshold_conversion_matches_distance_and_cosine_of_unit_vectors():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 64))
    b = a + rng.normal(scale=rng.uniform(0.1, 3, (500, 1)), size=(500, 64))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    cos = np.sum(a * b, axis=1)
    dist = np.sum((a - b) ** 2, axis=1)
    np.testing.assert_allclose([cosine_to_distance(c) for c in cos], dist, atol=1e-12)
    for t in (0.5, 1.127, 1.4):
        # verify's "same" (distance below t) is exactly compare's "same" (cosine above the converted t).
        assert np.array_equal(dist < t, cos > distance_to_cosine(t))
    assert distance_to_cosine(cosine_to_distance(0.3)) == pytest.approx(0.3)


def _report(path: Path, *, fp32_sha: str, int8_sha: str, fp32_t: float = 1.2, int8_t: float = 1.3, flip: bool = True) -> Path:
    # The keys `qpipe verify` writes in report.json (VerifyResult.to_dict).
    doc = {
        "fp32": {"path": "/elsewhere/fp32.onnx", "sha256": fp32_sha, "threshold_mean": fp32_t},
        "int8": {"path": "/elsewhere/int8.onnx", "sha256": int8_sha, "threshold_mean": int8_t},
        "data": {"lfw": {"fp32": {"threshold_mean": fp32_t}, "int8": {"threshold_mean": int8_t}}},
        "settings": {"verify": {"flip": flip}},
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "report.json").write_text(json.dumps(doc))
    return path


def test_report_threshold_is_the_compared_models_own(tmp_path):
    fp32 = tmp_path / "a.onnx"
    fp32.write_bytes(b"fp32 model bytes")
    other = tmp_path / "b.onnx"
    other.write_bytes(b"some other model")
    rep = _report(tmp_path / "rep", fp32_sha=sha256_file(fp32), int8_sha="0" * 64)
    got = threshold_from_report(rep, model=fp32)
    assert got.distance == 1.2 and "fp32" in got.source and got.flip is True
    # A model the report does not name gets the int8 threshold, and the source says so.
    got = threshold_from_report(rep / "report.json", model=other)
    assert got.distance == 1.3 and "not in the report" in got.source


def test_report_without_a_threshold_or_missing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="verify report not found"):
        threshold_from_report(tmp_path / "nowhere")
    (tmp_path / "report.json").write_text(json.dumps({"data": {"lfw": {"fp32": {"accuracy": 99.0}}}}))
    with pytest.raises(UserError, match="holds no threshold"):
        threshold_from_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read verify report"):
        threshold_from_report(tmp_path)


def test_compare_without_threshold_or_report_explains_what_to_pass(tmp_path):
    with pytest.raises(UserError) as e:
        compare(tmp_path / "a.jpg", tmp_path / "b.jpg", model=tmp_path / "m.onnx", input_spec=SPEC)
    assert "--threshold" in str(e.value) and "--report" in str(e.value)
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--model", "m.onnx"])
    assert res.exit_code == 2 and "--threshold" in res.output and "Traceback" not in res.output


# --- pairs ---------------------------------------------------------------------------------------------


def test_lfw_pairs_file_with_folds_header_maps_names_to_lfw_file_names(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("2\t1\nAnn 1 3\nBob\t2\tCy\t10\nDee 4 5\nEve 1 Fay 2\n")
    specs = parse_pairs(p, tmp_path / "img")
    assert [s.same for s in specs] == [True, False, True, False]
    assert specs[0].a == tmp_path / "img" / "Ann" / "Ann_0001.jpg"
    assert specs[1].b == tmp_path / "img" / "Cy" / "Cy_0010.jpg"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is empty"),
        ("ten\nAnn 1 2\nBob 1 Cy 2\n", ":1: expected a header"),
        ("2\nAnn 1 2\nBob 1 Cy 2\n", "promises 4 pair lines but the file has 2"),
        ("1\nAnn 1 2\nBob one Cy 2\n", ":3: expected 'name i j'"),
        ("1\nAnn 1 2 3 4 5\nBob 1 Cy 2\n", ":2: expected 'name i j'"),
    ],
)
def test_malformed_pairs_file_is_a_user_error_naming_the_line(tmp_path, text, message):
    p = tmp_path / "pairs.txt"
    p.write_text(text)
    with pytest.raises(UserError, match=message):
        parse_pairs(p, tmp_path)


def _people(counts: dict[str, int]) -> dict[str, list[Path]]:
    return {n: [Path(n) / f"{n}_{i:04d}.jpg" for i in range(1, k + 1)] for n, k in counts.items()}


def test_identity_pairs_are_balanced_alternating_distinct_and_seeded():
    people = _people({"A": 5, "B": 1, "C": 3, "D": 4, "E": 2})
    pairs = draw_pairs(people, 20, seed=7)
    assert len(pairs) == 20
    assert [p.same for p in pairs] == [True, False] * 10
    for p in pairs:
        assert (p.a.parent == p.b.parent) == p.same and p.a != p.b
    assert len({frozenset((p.a, p.b)) for p in pairs}) == 20
    assert draw_pairs(people, 20, seed=7) == pairs
    assert draw_pairs(people, 20, seed=8) != pairs


def test_identity_pairs_limited_by_few_same_person_pairs_stay_balanced():
    people = _people({"A": 2, "B": 2, "C": 1})  # only two same-person pairs exist
    pairs = draw_pairs(people, 10, seed=0)
    assert sum(p.same for p in pairs) == 2 and sum(not p.same for p in pairs) == 2


def test_identities_without_a_same_person_pair_is_a_user_error():
    with pytest.raises(UserError, match="at least two people"):
        draw_pairs(_people({"A": 1, "B": 1}), 10, seed=0)


# --- synthetic images, synthetic model -----------------------------------------------------------------


def test_embed_blank_or_unreadable_photo_is_a_user_error_naming_it(tmp_path):
    model = _synthetic_model(tmp_path)
    blank = _blank(tmp_path / "blank.jpg")
    with pytest.raises(UserError, match="no face found in .*blank.jpg"):
        embed([blank], model=model, input_spec=SPEC)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UserError, match="cannot decode image .*bad.png"):
        embed([bad], model=model, input_spec=SPEC)
    with pytest.raises(UserError, match="must be a .npy"):
        embed([blank], model=model, input_spec=SPEC, out=tmp_path / "e.txt")
    res = CliRunner().invoke(app, ["embed", str(bad), "--model", str(model), "-q"])
    assert res.exit_code == 2 and "bad.png" in res.output and "Traceback" not in res.output


# --- real photos -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(shared_raw, tmp_path_factory):
    """pairs.txt of ../shared/data/lfw_raw packed by pack_bin (done once for the module)."""
    out = tmp_path_factory.mktemp("packed") / "lfw_raw.bin"
    res = pack_bin(shared_raw, out, pairs=shared_raw / "pairs.txt")
    return res


@pytest.fixture(scope="module")
def shared_crops(shared_lfw):
    """The same 100 pairs as aligned in lfw.bin (images 2k and 2k+1 of pairs 0-49, 300-349)."""
    b = read_bin(shared_lfw)
    idx = [i for k in LFW_BIN_PAIRS for i in (2 * k, 2 * k + 1)]
    return b.decode_many(idx), b.issame[LFW_BIN_PAIRS]


@pytest.fixture(scope="module")
def views(packed, shared_crops, shared_model):
    """Raw and mirrored shared-MobileFaceNet embeddings (unit rows) of our crops and of the shared crops."""
    emb = FaceEmbedder(shared_model, SPEC, flip=False)
    ours = read_bin(packed.out).decode_many(range(200))
    theirs = shared_crops[0]
    return {
        "ours": emb(ours),
        "ours_flip": emb(np.ascontiguousarray(ours[:, :, ::-1])),
        "theirs": emb(theirs),
        "theirs_flip": emb(np.ascontiguousarray(theirs[:, :, ::-1])),
    }


def _protocol(e: np.ndarray, f: np.ndarray) -> np.ndarray:
    # verify's embedding: the normalised sum of the image's and its mirror's (unit vectors sum in the same direction).
    s = e + f
    return s / np.linalg.norm(s, axis=1, keepdims=True)


def test_pack_bin_writes_every_pair_of_the_lfw_folder(packed, shared_crops):
    assert packed.pairs == 100 and packed.same == 50 and packed.different == 50
    assert packed.photos == 162 and not packed.skipped and packed.dropped_pairs == 0
    b = read_bin(packed.out, validate=True)
    assert b.image_size == (112, 112)
    assert np.array_equal(b.issame, shared_crops[1])


def test_alignment_of_raw_photos_embeds_like_the_shared_crops(views, shared_raw):
    cos = np.sum(views["ours"] * views["theirs"], axis=1)
    # Each photo counted once (some appear in several pairs): rows 2k, 2k+1 are pair k's photos.
    rows = [p for s in parse_pairs(shared_raw / "pairs.txt", shared_raw) for p in (s.a, s.b)]
    first = sorted({p: i for i, p in reversed(list(enumerate(rows)))}.values())
    assert len(first) == 162
    cos = cos[first]
    frac = float(np.mean(cos >= 0.95))
    assert frac >= 0.95, f"only {frac:.1%} of the photos embed within cosine 0.95 of the shared alignment"
    assert np.median(cos) > 0.98


def test_packed_bin_verifies_within_one_point_of_the_same_pairs_in_lfw_bin(views, shared_crops):
    ours = _protocol(views["ours"], views["ours_flip"])
    ref = _protocol(views["theirs"], views["theirs_flip"])
    m_ours = evaluate(ours[0::2], ours[1::2], shared_crops[1], folds=10)
    m_ref = evaluate(ref[0::2], ref[1::2], shared_crops[1], folds=10)
    assert abs(m_ours.accuracy - m_ref.accuracy) <= 1.0, (m_ours.accuracy, m_ref.accuracy)
    assert m_ours.accuracy >= 97.0


def test_compare_with_a_verify_report_says_what_verify_predicts(packed, views, shared_raw, shared_model, tmp_path):
    from pipeline.data.bins import write_bin
    from pipeline.photos.detect import default_detector
    from pipeline.stages.report import write_reports
    from pipeline.stages.verify import verify

    # A real verify report on 20 of the packed pairs (10 same, 10 different, interleaved so every fold
    # has both); the shared model stands in for both fp32 and int8.
    chosen = [k for i in range(10) for k in (i, 50 + i)]
    b = read_bin(packed.out)
    sub = write_bin(tmp_path / "sub.bin", [b.encoded(i) for k in chosen for i in (2 * k, 2 * k + 1)], [bool(b.issame[k]) for k in chosen])
    fast = VerifySection(warmup=1, rounds=1, runs_per_round=1, throughput_batch=2, threads=1)
    vr = verify(shared_model, shared_model, [sub], input_spec=SPEC, verify=fast, gate=GateSection(min_speedup=0.0))
    write_reports(vr, tmp_path / "rep")
    thr = vr.datasets[0].fp32.metrics.threshold_mean

    ours = _protocol(views["ours"], views["ours_flip"])
    dist = np.sum((ours[0::2] - ours[1::2]) ** 2, axis=1)
    specs = parse_pairs(shared_raw / "pairs.txt", shared_raw)
    # Pairs clearly on one side of the threshold (compare embeds the crop itself, the .bin a JPEG of it).
    clear = [k for k in chosen if abs(dist[k] - thr) > 0.1]
    assert len(clear) >= 16
    detector = default_detector()
    embedder = FaceEmbedder(shared_model, SPEC, flip=True)
    for k in clear[:6] + clear[-6:]:
        r = compare(specs[k].a, specs[k].b, model=shared_model, input_spec=SPEC, report=tmp_path / "rep", detector=detector, embedder=embedder)
        assert r.threshold_distance == pytest.approx(thr) and "(the compared model)" in r.threshold_source
        assert r.same == bool(dist[k] < thr), (specs[k], r.cosine, r.threshold_cosine)
        assert abs(r.distance - dist[k]) < 0.1


def test_compare_cli_says_same_for_one_person_and_different_for_two(shared_raw, shared_model):
    a = shared_raw / "Akhmed_Zakayev" / "Akhmed_Zakayev_0001.jpg"
    b = shared_raw / "Akhmed_Zakayev" / "Akhmed_Zakayev_0003.jpg"
    c = shared_raw / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"
    runner = CliRunner()
    same = runner.invoke(app, ["compare", str(a), str(b), "--model", str(shared_model), "--threshold", "0.44"])
    assert same.exit_code == 0 and same.output.startswith("same: cosine"), same.output
    diff = runner.invoke(app, ["compare", str(a), str(c), "--model", str(shared_model), "--threshold", "0.44", "--json"])
    assert diff.exit_code == 0, diff.output
    d = json.loads(diff.output)
    assert d["verdict"] == "different" and d["cosine"] < 0.44
    assert d["threshold_distance"] == pytest.approx(2 - 2 * 0.44)


def test_embed_writes_unit_vectors_and_an_index_atomically(shared_raw, shared_model, tmp_path):
    photos = [shared_raw / "Abel_Pacheco" / f"Abel_Pacheco_000{i}.jpg" for i in (1, 2)]
    out = tmp_path / "emb" / "faces.npy"
    res = embed(photos, model=shared_model, input_spec=SPEC, out=out)
    arr = np.load(out)
    assert arr.shape == (2, 128) and arr.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, atol=1e-5)
    index = json.loads((tmp_path / "emb" / "faces.json").read_text())
    assert [r["path"] for r in index["images"]] == [str(p) for p in photos]
    assert index["model_sha256"] == sha256_file(shared_model) and index["dim"] == 128
    assert sorted(x.name for x in out.parent.iterdir()) == ["faces.json", "faces.npy"]
    # Two photos of one person are closer than a photo of someone else.
    other = embed([shared_raw / "Amber_Tamblyn" / "Amber_Tamblyn_0001.jpg"], model=shared_model, input_spec=SPEC)
    assert float(res.embeddings[0] @ res.embeddings[1]) > float(res.embeddings[0] @ other.embeddings[0])
    assert "embedding" in other.to_dict()["images"][0]


def _small_lfw_folder(shared_raw: Path, root: Path) -> Path:
    for name in ("Abel_Pacheco", "Akhmed_Zakayev"):
        shutil.copytree(shared_raw / name, root / name)
    _blank(root / "Nobody" / "Nobody_0001.jpg")
    (root / "Nobody" / "Nobody_0002.jpg").write_bytes(b"not a jpeg at all")
    (root / "pairs.txt").write_text(
        "2\n"
        "Abel_Pacheco\t1\t4\n"
        "Nobody\t1\t2\n"
        "Abel_Pacheco\t1\tAkhmed_Zakayev\t1\n"
        "Nobody\t1\tAkhmed_Zakayev\t3\n"
    )
    return root


def test_pack_bin_lists_and_skips_photos_without_a_face_and_drops_their_pairs(shared_raw, tmp_path):
    root = _small_lfw_folder(shared_raw, tmp_path / "photos")
    res = pack_bin(root, tmp_path / "out.bin", pairs=root / "pairs.txt")
    assert (res.pairs, res.same, res.different, res.dropped_pairs) == (2, 1, 1, 2)
    reasons = {Path(s["path"]).name: s["reason"] for s in res.skipped}
    assert reasons["Nobody_0001.jpg"] == "no face found"
    assert "cannot decode" in reasons["Nobody_0002.jpg"]
    b = read_bin(tmp_path / "out.bin", validate=True)
    assert list(b.issame) == [True, False]

    with pytest.raises(UserError, match=r"2 photo\(s\) cannot be packed \(--strict\).*Nobody_0001.jpg: no face found"):
        pack_bin(root, tmp_path / "strict.bin", pairs=root / "pairs.txt", strict=True)
    assert not (tmp_path / "strict.bin").exists()

    cli = CliRunner().invoke(app, ["pack-bin", "--images", str(root), "--pairs", str(root / "pairs.txt"), "--out", str(tmp_path / "c.bin"), "-q"])
    assert cli.exit_code == 0 and "skipped 2 photo(s) and 2 pair(s)" in cli.output, cli.output


def test_pack_bin_identities_draws_seeded_pairs_from_photos_with_a_face(shared_raw, tmp_path):
    root = tmp_path / "people"
    for name in ("Abel_Pacheco", "Akhmed_Zakayev", "Anders_Fogh_Rasmussen"):
        shutil.copytree(shared_raw / name, root / name)
    _blank(root / "Abel_Pacheco" / "blank.jpg")
    res = pack_bin(root, tmp_path / "id.bin", identities=True, num_pairs=8, seed=3)
    assert (res.pairs, res.same, res.different, res.dropped_pairs) == (8, 4, 4, 0)
    assert [Path(s["path"]).name for s in res.skipped] == ["blank.jpg"]
    b = read_bin(tmp_path / "id.bin", validate=True)
    assert list(b.issame) == [True, False] * 4
    with pytest.raises(UserError, match="exactly one of --pairs"):
        pack_bin(root, tmp_path / "x.bin", identities=True, pairs=root / "pairs.txt")
