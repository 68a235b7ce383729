"""The accuracy INC's accuracy-aware tuning optimises: the LFW protocol on a subset of pairs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from pipeline.data.bins import VerificationBin
from pipeline.eval import protocol
from pipeline.eval.embeddings import embed_pairs_with_info

if TYPE_CHECKING:
    from pipeline.recipe import InputSpec


def pair_accuracy(
    model: onnx.ModelProto | bytes | Path,
    pairs_bin: VerificationBin,
    spec: "InputSpec",
    *,
    pairs: int | None = None,
    folds: int = 10,
    flip: bool = True,
    batch: int = 32,
) -> protocol.VerificationMetrics:
    """The insightface protocol on the first ``pairs`` pairs (all pairs when None).

    ``batch``: images per forward pass when the model's batch is dynamic; a model
    with a fixed batch of 1 is run one image at a time.
    """
    n_pairs = pairs_bin.num_pairs if pairs is None else min(pairs, pairs_bin.num_pairs)
    e, _ = embed_pairs_with_info(model, pairs_bin, input_spec=spec, flip=flip, batch=batch, pairs=n_pairs)
    return protocol.evaluate(e[0::2], e[1::2], pairs_bin.issame[:n_pairs], folds=folds)
