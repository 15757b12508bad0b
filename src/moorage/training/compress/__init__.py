"""Derived versions that are smaller or faster than their parent (ONNX export, int8, head pruning,
distillation), each registered only when its measured quality passes the gates in settings."""
