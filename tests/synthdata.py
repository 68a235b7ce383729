"""Small synthetic stand-ins for the real material, built offline in a fresh clone.

- :func:`face_model`: an opset-11 ONNX graph shaped like an ArcFace/MobileFaceNet
  export (raw 0..255 input normalised inside the graph, Conv + BatchNormalization
  + PRelu blocks, a depthwise Conv, Flatten + Gemm embedding), dynamic batch,
  seeded weights. Small enough that quantizing it takes a second or two.
- :func:`face_images` / :func:`synthetic_bin`: seeded smooth "faces" as BGR JPEGs
  and an insightface ``.bin`` of same/different pairs (a same pair is two noisy
  views of one base image), so verification accuracy on it is meaningful.
- :func:`python2_bin_pickle` and :func:`malicious_pickle`: hand-written pickles for
  the reader's compatibility and security tests.

Import from tests as ``from tests.synthdata import ...`` or ``from synthdata import ...``.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "data"
OUTPUT_NAME = "fc1"


def face_model(
    path: str | os.PathLike[str] | None = None,
    *,
    size: tuple[int, int] = (32, 32),
    embedding: int = 16,
    width: int = 8,
    seed: int = 0,
    dynamic_batch: bool = True,
    opset: int = 11,
    ir_version: int = 6,
) -> onnx.ModelProto:
    """A seeded face-embedding-like model; saved to ``path`` when given."""
    rng = np.random.default_rng(seed)
    h, w = size
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    # ArcFace-style: the graph takes raw pixels and normalises them itself.
    nodes.append(helper.make_node("Sub", [INPUT_NAME, const("mean", np.full((1, 3, 1, 1), 127.5))], ["sub0"], name="minus_mean"))
    nodes.append(helper.make_node("Mul", ["sub0", const("scale", np.full((1, 3, 1, 1), 1 / 128))], ["norm0"], name="times_scale"))

    def block(x: str, cin: int, cout: int, i: int, *, stride: int = 1, group: int = 1, prelu: bool = True) -> str:
        k = rng.normal(0, np.sqrt(2.0 / (9 * cin / group)), (cout, cin // group, 3, 3))
        nodes.append(
            helper.make_node(
                "Conv", [x, const(f"conv{i}_w", k)], [f"conv{i}"], name=f"conv{i}",
                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride], group=group,
            )
        )
        bn = [
            const(f"bn{i}_gamma", rng.uniform(0.5, 1.5, cout)),
            const(f"bn{i}_beta", rng.normal(0, 0.1, cout)),
            const(f"bn{i}_mean", rng.normal(0, 0.1, cout)),
            const(f"bn{i}_var", rng.uniform(0.5, 1.5, cout)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}", *bn], [f"bn{i}"], name=f"bn{i}", epsilon=1e-5))
        if not prelu:
            return f"bn{i}"
        slope = const(f"prelu{i}_slope", rng.uniform(0.1, 0.3, (cout, 1, 1)))
        nodes.append(helper.make_node("PRelu", [f"bn{i}", slope], [f"relu{i}"], name=f"prelu{i}"))
        return f"relu{i}"

    x = block("norm0", 3, width, 1, stride=2)
    x = block(x, width, width, 2, group=width)  # depthwise, as in MobileFaceNet
    x = block(x, width, 2 * width, 3, stride=2)
    x = block(x, 2 * width, 2 * width, 4, prelu=False)
    nodes.append(helper.make_node("Add", [x, "relu3"], ["res4"], name="residual4"))
    nodes.append(helper.make_node("Flatten", ["res4"], ["flat"], name="flatten", axis=1))
    feat = 2 * width * ((h + 3) // 4) * ((w + 3) // 4)
    fc = rng.normal(0, np.sqrt(1.0 / feat), (embedding, feat))
    nodes.append(
        helper.make_node("Gemm", ["flat", const("fc1_w", fc), const("fc1_b", np.zeros(embedding))], [OUTPUT_NAME], name="fc1", transB=1)
    )

    batch: str | int = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        nodes,
        "synthetic_face",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [batch, 3, h, w])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [batch, embedding])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="qpipe-tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return model


def _base_face(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth random BGR image: a few coloured Gaussian blobs on a gradient."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(40, 200, 3)
    img += (xx / w)[..., None] * rng.uniform(-60, 60, 3)
    for _ in range(4):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        s = rng.uniform(0.1, 0.3) * min(h, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        img += blob[..., None] * rng.uniform(-100, 100, 3)
    return img


def _jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.clip(img, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def face_images(n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[bytes]:
    """``n`` seeded BGR JPEGs of independent random "faces"."""
    rng = np.random.default_rng(seed)
    return [_jpeg(_base_face(rng, size)) for _ in range(n)]


def synthetic_pairs(pairs: int = 20, size: tuple[int, int] = (32, 32), seed: int = 0) -> tuple[list[bytes], list[bool]]:
    """Images and labels of a verification set: alternating same/different pairs."""
    rng = np.random.default_rng(seed)
    images: list[bytes] = []
    issame: list[bool] = []
    for k in range(pairs):
        same = k % 2 == 0
        a = _base_face(rng, size)
        b = a if same else _base_face(rng, size)
        images.append(_jpeg(a + rng.normal(0, 6, a.shape)))
        images.append(_jpeg(b + rng.normal(0, 6, b.shape)))
        issame.append(same)
    return images, issame


def synthetic_bin(path: str | os.PathLike[str], pairs: int = 20, size: tuple[int, int] = (32, 32), seed: int = 0) -> Path:
    """Write an insightface-format ``.bin`` of ``pairs`` synthetic pairs."""
    from pipeline.data.bins import write_bin

    images, issame = synthetic_pairs(pairs, size, seed)
    return write_bin(path, images, issame)


# --- hand-written pickles -------------------------------------------------------


def _short_binstring(b: bytes) -> bytes:
    # Python 2 `str` (protocol 2): SHORT_BINSTRING / BINSTRING.
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def python2_bin_pickle(images: Sequence[bytes], issame: Sequence[bool], *, numpy_labels: bool = True) -> bytes:
    """The bytes Python 2 + numpy 1.x ``pickle.dump((images, issame), f, protocol=2)`` writes.

    Images are Python 2 ``str`` (loaded as bytes with ``encoding='bytes'``);
    the labels are a numpy bool array (as in several published .bin files) or a list.
    """
    out = [b"\x80\x02", b"(", b"]", b"("]
    for img in images:
        out.append(_short_binstring(bytes(img)))
    out.append(b"e")  # APPENDS
    if numpy_labels:
        data = bytes(int(bool(v)) for v in issame)
        out += [
            b"cnumpy.core.multiarray\n_reconstruct\n",
            b"cnumpy\nndarray\n",
            b"K\x00\x85", _short_binstring(b"b"), b"\x87R",  # _reconstruct(ndarray, (0,), 'b')
            b"(K\x01", b"J" + struct.pack("<i", len(data)) + b"\x85",  # state: (1, (n,), dtype, False, data)
            b"cnumpy\ndtype\n", _short_binstring(b"b1"), b"K\x00K\x01\x87R",
            b"(K\x03", _short_binstring(b"|"), b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",
            b"\x89", _short_binstring(data), b"tb",
        ]
    else:
        out.append(b"]")
        out.append(b"(" + b"".join(b"\x88" if v else b"\x89" for v in issame) + b"e")
    out.append(b"t.")  # TUPLE, STOP
    return b"".join(out)


class _Evil:
    def __init__(self, call, args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def malicious_pickle(target: str | os.PathLike[str], *, via: str = "os.system", pairs: int = 1) -> bytes:
    """A well-formed-looking .bin whose unpickling would create ``target``.

    ``via``: ``os.system`` (runs ``touch``), ``open`` (builtins.open for
    writing) or ``numpy`` (numpy.save, a numpy global the reader must refuse).
    """
    target = str(target)
    if via == "os.system":
        evil = _Evil(os.system, (f"touch {target}",))
    elif via == "open":
        import builtins

        evil = _Evil(builtins.open, (target, "w"))
    elif via == "numpy":
        evil = _Evil(np.save, (target, np.zeros(1)))
    else:
        raise ValueError(via)
    images = [b"\xff\xd8 not a real jpeg"] * (2 * pairs - 1) + [evil]
    return pickle.dumps((images, [True] * pairs), protocol=2)
