"""Property-based checks of the two parsers that read files users get from elsewhere.

- :func:`pipeline.data.bins.read_bin` on arbitrary bytes, on valid ``.bin`` pickles
  mutated byte by byte (flips, cuts, insertions, spliced opcodes), and on
  pickles of arbitrary nested structures that look almost like a ``.bin``;
- :func:`pipeline.recipe.load_recipe` on arbitrary and YAML-shaped text, and
  :func:`pipeline.recipe.parse_recipe` / :func:`~pipeline.recipe.with_overrides`
  on arbitrary nested data.

The property in every case: the call returns a valid result or raises
:class:`~pipeline.core.errors.UserError`; any other exception type (the CLI would
print a traceback) fails the test. Each test is bounded by ``max_examples``;
the file runs in well under 30 s.
"""

from __future__ import annotations

import pickle
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.data.bins import VerificationBin, read_bin
from pipeline.core.errors import UserError
from pipeline.recipe import Recipe, default_recipe, load_recipe, parse_recipe, with_overrides
from tests.synthdata import face_images, python2_bin_pickle

# One scratch directory for the whole module: hypothesis runs many examples per test,
# and function-scoped tmp_path would be shared between them anyway.
_SCRATCH = Path(tempfile.mkdtemp(prefix="qpipe-properties-"))

_FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _read_bin_bytes(data: bytes, validate: bool = True) -> VerificationBin | None:
    """read_bin on ``data``: the result, or None for a UserError. Anything else propagates."""
    path = _SCRATCH / "case.bin"
    path.write_bytes(data)
    try:
        vb = read_bin(path, validate=validate)
    except UserError as e:
        assert str(e).strip() and "\n" not in str(e), f"a UserError should be one line: {e!r}"
        return None
    # A result is a usable .bin: two images per pair, bool labels, every image decodable.
    assert isinstance(vb, VerificationBin)
    assert vb.num_images == 2 * vb.num_pairs > 0
    assert vb.issame.dtype == np.bool_ and vb.issame.shape == (vb.num_pairs,)
    return vb


# --- the .bin reader ---------------------------------------------------------------------

_IMAGES = face_images(4, size=(8, 8), seed=3)
_LABELS = [True, False]


def _valid_pickles() -> list[bytes]:
    """Small valid .bin files in every form the reader accepts."""
    out = []
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        out.append(pickle.dumps((_IMAGES, _LABELS), protocol=protocol))
        out.append(pickle.dumps((_IMAGES, np.array(_LABELS)), protocol=protocol))
    out.append(python2_bin_pickle(_IMAGES, _LABELS, numpy_labels=True))
    out.append(python2_bin_pickle(_IMAGES, _LABELS, numpy_labels=False))
    return out


VALID = _valid_pickles()


def test_every_seed_pickle_is_read():
    # The mutation tests below start from these; they must be valid to begin with.
    for data in VALID:
        vb = _read_bin_bytes(data)
        assert vb is not None and vb.num_pairs == 2


# Opcodes that change a pickle's structure when spliced in: globals, reduce/build, memo, frames, marks.
_OPCODES = [bytes([c]) for c in b"()[]}ectbRsuaglpqhjIJKLMNPQSTUVXBC\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98."]
_OPCODES += [b"cos\nsystem\n", b"cbuiltins\neval\n", b"cnumpy\ndtype\n", b"cnumpy\nndarray\n", b"cnumpy.core.multiarray\n_reconstruct\n",
             b"c_codecs\nencode\n", b"\x8c\x05numpy\x8c\x05dtype\x93", b"J\xff\xff\xff\x7f", b"B\xff\xff\xff\x7f"]


@st.composite
def mutated_pickle(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete", "opcode", "duplicate"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del data[i:]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        elif kind == "opcode":
            data[i:i] = draw(st.sampled_from(_OPCODES))
        elif kind == "duplicate":
            j = draw(st.integers(i, min(len(data), i + 32)))
            data[j:j] = data[i:j]
    return bytes(data)


@settings(max_examples=400, **_FAST)
@given(data=mutated_pickle())
def test_mutated_valid_pickles_give_a_bin_or_a_user_error(data: bytes) -> None:
    _read_bin_bytes(data)


@settings(max_examples=200, **_FAST)
@given(head=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05\x95", b"(", b"]", b"\x80\x02]q\x00("]), tail=st.binary(max_size=400))
def test_arbitrary_bytes_after_a_pickle_header_give_a_bin_or_a_user_error(head: bytes, tail: bytes) -> None:
    _read_bin_bytes(head + tail)


# Python objects a .bin-like pickle might hold: almost-right structures, wrong types, bad images.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=16),
    st.sampled_from(_IMAGES),
    st.just(_IMAGES[0][: len(_IMAGES[0]) // 2]),  # a truncated JPEG
    st.just(b"\x89PNG\r\n\x1a\n"),
)
_objects = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(st.text(max_size=4), inner, max_size=3),
        st.lists(st.booleans(), max_size=4).map(lambda v: np.array(v, dtype=bool)),
        st.lists(st.integers(0, 255), max_size=4).map(lambda v: np.array(v, dtype=np.uint8)),
    ),
    max_leaves=12,
)


@st.composite
def bin_like(draw) -> object:
    """(images, labels) pairs that are often valid and often subtly not."""
    n = draw(st.integers(0, 3))
    images = draw(st.one_of(st.lists(st.sampled_from(_IMAGES), min_size=2 * n, max_size=2 * n), st.lists(_scalars, max_size=6), _objects))
    labels = draw(st.one_of(st.lists(st.booleans(), min_size=n, max_size=n), st.lists(st.integers(-1, 2), max_size=4), _objects))
    shape = draw(st.sampled_from(["pair", "triple", "list", "bare"]))
    return {"pair": (images, labels), "triple": (images, labels, None), "list": [images, labels], "bare": images}[shape]


@settings(max_examples=300, **_FAST)
@given(obj=st.one_of(bin_like(), _objects), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_pickles_of_arbitrary_structures_give_a_bin_or_a_user_error(obj: object, protocol: int) -> None:
    _read_bin_bytes(pickle.dumps(obj, protocol=protocol))


# --- the recipe loader ---------------------------------------------------------------------

_KEYS = [
    "name", "model", "urls", "sha256", "member", "filename", "input", "size", "channels", "layout", "scale", "mean", "std",
    "output", "license", "description", "data", "convert", "opset", "dynamic_batch", "check_samples", "min_cosine",
    "calibration", "samples", "seed", "batch", "flip", "quantization", "engine", "approach", "format", "per_channel",
    "reduce_range", "calibration_method", "op_types_to_quantize", "op_types_to_exclude", "nodes_to_exclude",
    "inc_recipes", "extra_options", "tuning", "enabled", "recovery", "verify", "pairs", "folds", "threads", "rounds",
    "gate", "max_accuracy_drop", "min_speedup",
]
_yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["m.onnx", "https://example.com/m.onnx", "RGB", "BGR", "inc", "ort", "QDQ", "a" * 64, "", "112"]),
)
_yaml_data = st.recursive(
    _yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6), st.integers(0, 3), st.none()), inner, max_size=5),
    ),
    max_leaves=20,
)


@st.composite
def recipe_like(draw) -> dict:
    """A mostly-valid recipe with random sections replaced, dropped or added."""
    data: dict = {"name": "x", "model": {"urls": ["m.onnx"]}}
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.lists(st.sampled_from(_KEYS), min_size=1, max_size=3))
        node = data
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        if draw(st.booleans()):
            node[path[-1]] = draw(_yaml_data)
        else:
            node.pop(path[-1], None)
    return data


def _parse(data: object) -> Recipe | None:
    try:
        r = parse_recipe(data, "hypothesis")
    except UserError as e:
        assert str(e).startswith("invalid recipe:"), str(e)
        return None
    # A recipe that parses is usable: it resolves and hashes.
    assert isinstance(r, Recipe) and len(r.sha256()) == 64
    return r


@settings(max_examples=200, **_FAST)
@given(data=st.one_of(recipe_like(), _yaml_data))
def test_arbitrary_nested_data_gives_a_recipe_or_a_user_error(data: object) -> None:
    _parse(data)


def _load_text(text: str) -> Recipe | None:
    path = _SCRATCH / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        r = load_recipe(path)
    except UserError as e:
        assert "\n" not in str(e), f"a UserError should be one line: {e!r}"
        return None
    assert isinstance(r, Recipe) and len(r.sha256()) == 64
    return r


_YAML_BITS = [
    "name: x\n", "model:\n", "  urls: [m.onnx]\n", "  urls:\n  - m.onnx\n", "  input: {size: [112, 112]}\n", "data: {urls: [d.bin]}\n",
    "quantization:\n", "  engine: ort\n", "  extra_options: &a {x: *a}\n", "  inc_recipes: {k: [1, 2]}\n", "calibration: {samples: 3}\n",
    "&x ", "*x ", "!!python/object:os.system ", "!!binary aGVsbG8= ", "? ", "- ", ": ", "{", "}", "[", "]", ",", "'", '"', "|\n", ">\n",
    "#c\n", "\t", "  ", "\n", "---\n", "...\n", "%YAML 1.1\n", "<<: *x\n", "~", "null", "yes", "0x1F", "1e400", ".nan", "\x00", "\ufeff",
]


@settings(max_examples=300, **_FAST)
@given(parts=st.lists(st.one_of(st.sampled_from(_YAML_BITS), st.text(alphabet=string.printable, max_size=6)), max_size=25))
def test_yaml_shaped_text_gives_a_recipe_or_a_user_error(parts: list[str]) -> None:
    _load_text("".join(parts))


@settings(max_examples=150, **_FAST)
@given(text=st.text(max_size=300))
def test_arbitrary_text_gives_a_recipe_or_a_user_error(text: str) -> None:
    _load_text(text)


_DOTTED = ["name", "model.urls", "model.input.size", "model.input.channels", "convert.opset", "calibration.samples", "quantization.engine",
           "quantization.tuning.enabled", "verify.pairs", "gate.min_speedup", "gate", "model", "nope.key", "verify.pairs.deeper"]


@settings(max_examples=150, **_FAST)
@given(overrides=st.dictionaries(st.sampled_from(_DOTTED), _yaml_data, max_size=3))
def test_command_line_overrides_give_a_recipe_or_a_user_error(overrides: dict) -> None:
    try:
        r = with_overrides(default_recipe(), overrides)
    except UserError:
        return
    assert len(r.sha256()) == 64


# Shapes hypothesis is unlikely to reach by chance, each once.
_DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    "text",
    [
        "name: x\nmodel: {urls: [m.onnx]}\nquantization:\n  extra_options: &a {x: *a}\n",  # an alias that contains itself
        "name: x\nmodel: {urls: [m.onnx]}\nquantization:\n  extra_options: {x: " + _DEEP + "}\n",  # nesting past Python's recursion limit
        "name: x\nmodel: {urls: [m.onnx]}\nquantization:\n  extra_options: {x: " + "[" * 300 + "]" * 300 + "}\n",  # past pydantic's
        "name: x\nmodel: {urls: [m.onnx]}\nquantization:\n  inc_recipes: {k: " + "{a: " * 200 + "1" + "}" * 200 + "}\n",
    ],
    ids=["recursive-alias", "deep-5000", "deep-300", "deep-mapping-200"],
)
def test_pathological_yaml_structures_are_user_errors(text: str) -> None:
    with pytest.raises(UserError, match="invalid (recipe|YAML)"):
        load_recipe(_write(text))


def test_alias_expansion_bomb_is_refused_quickly() -> None:
    # "Billion laughs": nine levels of nine aliases would expand to 387 million strings.
    lines = ["name: x", "model: {urls: [m.onnx]}", "quantization:", "  extra_options:", "    a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    with pytest.raises(UserError, match="invalid recipe: .*expands"):
        load_recipe(_write("\n".join(lines) + "\n"))


def test_anchors_and_aliases_within_reason_still_work() -> None:
    r = load_recipe(_write("name: &n x\nmodel:\n  urls: &u [m.onnx]\n  description: *n\ndata: {urls: *u}\n"))
    assert r.model.description == "x" and r.data is not None and r.data.urls == ["m.onnx"]


def _write(text: str) -> Path:
    path = _SCRATCH / "pathological.yaml"
    path.write_text(text, encoding="utf-8")
    return path
