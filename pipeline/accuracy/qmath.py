"""The engines' quantization arithmetic: activation and weight scales, fake quantization, the int32 bias.

Pure numpy, arrays in and numbers out, written to match what INC 3.7 and
onnxruntime compute (the tests compare against INC's own functions).
"""

from __future__ import annotations

import math

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def activation_qparams(lo: float, hi: float, levels: int) -> tuple[float, int]:
    """(scale, zero point) of uint8 asymmetric quantization of [lo, hi] (zero always representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi - lo <= 0:
        return 1.0, 0
    scale = (hi - lo) / levels
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return float(np.float32(scale)), zp


def weight_scales(w: np.ndarray, axis: int | None, half_levels: int) -> np.ndarray:
    """Symmetric int8 scales: one per output channel (``axis``) or one for the tensor (axis None).

    A channel whose weights are all zero gets scale 1.0, as both engines do.
    """
    if axis is None:
        m = np.array([np.max(np.abs(w))]) if w.size else np.zeros(1)
    else:
        m = np.max(np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)), axis=1)
    scale = (m.astype(np.float64) / half_levels).astype(np.float32)
    scale[m == 0] = 1.0
    return scale


def fake_quant_weight(w: np.ndarray, scales: np.ndarray, axis: int | None, half_levels: int) -> np.ndarray:
    """``w`` quantized to int8 with ``scales`` and back to float32."""
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    s = scales.reshape(shape) if axis is not None else scales.reshape(())
    q = np.clip(np.round(w / s), -half_levels, half_levels)
    return (q * s).astype(np.float32)


def quantize_bias(b: np.ndarray, bias_scale: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias as the engine computes it, and a mask of channels that overflowed int32.

    ``mode``: "wrap" (INC: numpy's invalid cast, out-of-range values become INT32_MIN)
    or "clip" (onnxruntime: saturate), as :attr:`QuantScheme.bias_overflow` says.
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        raw = np.round(b.astype(np.float64) / bias_scale.astype(np.float64))
        overflow = ~np.isfinite(raw) | (raw < INT32_MIN) | (raw > INT32_MAX)
        if mode == "wrap":
            q = np.where(overflow, INT32_MIN, np.nan_to_num(raw)).astype(np.int64)
        else:
            q = np.clip(np.nan_to_num(raw, nan=0.0, posinf=INT32_MAX, neginf=INT32_MIN), INT32_MIN, INT32_MAX).astype(np.int64)
    return q, overflow
