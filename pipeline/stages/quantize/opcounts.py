"""Counting a quantized graph's nodes as int8 or fp32, so int8 and fp32 models compare op for op."""

from __future__ import annotations

from collections import Counter

import onnx

from pipeline.runtime.graph import graph_links

# onnxruntime's QOperator kernels -> the float op they replace, so int8 and fp32 counts line up.
QOP_TO_FLOAT = {
    "QGemm": "Gemm",
    "ConvInteger": "Conv",
    "MatMulInteger": "MatMul",
    "QAttention": "Attention",
    "QEmbedLayerNormalization": "EmbedLayerNormalization",
    "QLinearWhere": "Where",
}
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
# In onnxruntime's QDQ registry only so that its quantizer can fold them into a Conv: onnxruntime has no int8
# kernel for them, so one left between DequantizeLinear and QuantizeLinear runs in fp32.
NO_INT8_KERNEL = frozenset({"BatchNormalization", "InstanceNormalization", "LayerNormalization"})


def count_ops(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Nodes by op type, split into int8 and fp32 (Quantize/DequantizeLinear counted apart).

    QOperator: ``QLinearConv`` counts as an int8 ``Conv``; data-movement ops
    (Flatten, Reshape, MaxPool...) whose input is already quantized count as
    int8. QDQ: an op counts as int8 when it sits between DequantizeLinear and
    QuantizeLinear and onnxruntime has an int8 kernel or fusion for its type
    (the quantizer's registries); any other op between Q/DQ pairs runs in fp32.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    int8_capable = (set(QDQRegistry) | set(QLinearOpsRegistry)) - NO_INT8_KERNEL
    producer, consumers = graph_links(model)

    def requantized(node: onnx.NodeProto) -> bool:
        users = [u for out in node.output for u in consumers.get(out, [])]
        return bool(users) and all(u.op_type == "QuantizeLinear" for u in users)
    quantized: set[str] = set()  # tensors holding int8/uint8 values (QOperator)
    counts: dict[str, Counter[str]] = {"int8": Counter(), "fp32": Counter(), "quant_dequant": Counter()}
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        op = node.op_type
        first = node.input[0] if node.input else ""
        if op in QDQ_OPS:
            counts["quant_dequant"][op] += 1
            if op == "QuantizeLinear":
                quantized.update(node.output)
            continue
        if op.startswith("QLinear") or op in QOP_TO_FLOAT:
            counts["int8"][QOP_TO_FLOAT.get(op, op[len("QLinear") :])] += 1
            quantized.update(node.output)
        elif first in quantized:
            counts["int8"][op] += 1
            quantized.update(node.output)
        elif (
            op in int8_capable
            and first in producer
            and producer[first].op_type == "DequantizeLinear"
            and requantized(node)
        ):
            counts["int8"][op] += 1
        else:
            counts["fp32"][op] += 1
    return {k: dict(sorted(v.items())) for k, v in counts.items()}
