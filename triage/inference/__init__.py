"""Running the model: the ONNX model wrapper and the one decoder pool with crash isolation.

Needs only onnxruntime and numpy in the calling process; the decoder pool runs
the imaging code in separate processes by name.
"""
