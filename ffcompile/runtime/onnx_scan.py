"""Finding external-data tensors in serialized ONNX without the onnx package (a device has only
onnxruntime): a reader of the protobuf wire format that descends only into the fields that can
hold tensors (graphs, nodes, attributes, functions, sparse tensors). Field numbers from onnx.proto.
"""

from __future__ import annotations

from ..core.errors import FFCompileError

# message kind -> {field number: kind of the nested message}
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto external_data
_TENSOR_DATA_LOCATION = 14  # enum DataLocation, EXTERNAL = 1


class OnnxScanError(FFCompileError):
    pass


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxScanError("truncated or malformed varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def uses_external_data(model_bytes: bytes) -> bool:
    """Whether any tensor of the model keeps its data in an external file. Raises OnnxScanError
    on bytes that are not well-formed protobuf."""
    data = memoryview(model_bytes)
    stack = [("model", 0, len(data))]
    while stack:
        kind, pos, end = stack.pop()
        while pos < end:
            key, pos = _varint(data, pos, end)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, pos = _varint(data, pos, end)
                if kind == "tensor" and field == _TENSOR_DATA_LOCATION and value == 1:
                    return True
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise OnnxScanError("a field runs past the end of its message")
                if kind == "tensor" and field == _TENSOR_EXTERNAL_DATA:
                    return True
                child = _CHILDREN[kind].get(field)
                if child is not None:
                    stack.append((child, pos, pos + length))
                pos += length
            else:
                raise OnnxScanError(f"unsupported wire type {wire}")
            if pos > end:
                raise OnnxScanError("a field runs past the end of its message")
    return False
