"""edgediff exporter: reference networks, training, and self-describing ONNX export."""

__version__ = "0.1.0"
