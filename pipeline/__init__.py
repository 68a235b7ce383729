"""qpipe: turn an ArcFace-style ONNX face model into a verified int8 artifact."""

__version__ = "0.1.0"
