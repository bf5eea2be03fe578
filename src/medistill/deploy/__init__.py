"""Deployment: ONNX export with parity checks, onnxruntime sessions, latency/params/FLOPs profiling."""
