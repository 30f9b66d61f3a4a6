"""The compiler: tensor programs -> ONNX (``onnx_emit``) -> onnxruntime or TVM (``tvm_build``), targets,
and the bundle builder (``build``)."""
