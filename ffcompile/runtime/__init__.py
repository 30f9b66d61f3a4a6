"""The torch-free runtime that goes onto devices: load and verify a bundle, run its programs with
onnxruntime or the TVM runtime, fine-tune it."""
