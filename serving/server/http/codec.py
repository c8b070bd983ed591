"""The KServe v2 REST body <-> the gRPC messages of `inference.GRPCInferenceService`, so that a REST call runs
the very code a gRPC call runs: a request body (JSON, or JSON then binary tensors as Triton's binary tensor
extension lays them out) becomes one `ModelInferRequest`, and the `ModelInferResponse` becomes JSON, or JSON
then binary tensors.

Every input goes into `raw_input_contents` as bytes with its datatype and shape, whatever its form on the
wire: a binary input as it came, JSON data (flat or nested, row-major) packed little-endian in its datatype,
BYTES elements as Triton's 4-byte length then the bytes. Nothing is decoded into the model's input here:
the KServe servicer checks the datatype and the shape and converts, as it does for gRPC.

Binary tensor extension (Triton's `binary_tensor_data`): the `Inference-Header-Content-Length` header gives
the length of the JSON part; each binary input has the parameter `binary_data_size` and its bytes follow the
JSON in the order of the inputs. An output is answered binary when it has the parameter `binary_data: true`
or the request has `binary_data_output: true`; its bytes follow the response's JSON and the output has
`binary_data_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import orjson

from ...engine.errors import InvalidInput, shown
from ...wire.inference import grpc_service_pb2 as pb
from ..api.kserve.tensors import deserialize_bytes, serialize_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE, BINARY_DATA, BINARY_DATA_OUTPUT = "binary_data_size", "binary_data", "binary_data_output"
# Little-endian numpy types of the KServe v2 datatypes that JSON data may be given in (BYTES apart).
NUMPY_TYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
MAX_DIMS = 8
MAX_NAME_CHARS = 1024  # a model, tensor or parameter name longer than this is refused, never echoed whole


@dataclass
class InferBody:
    """One infer request as the servicer takes it, and how its outputs are to be answered."""
    request: pb.ModelInferRequest
    binary_outputs: set[str]       # outputs answered as binary data
    all_binary: bool               # binary_data_output: every output binary unless it says otherwise
    json_outputs: set[str]         # outputs that asked binary_data: false


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {_kind(value)}")
    return value


def _kind(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _string(value, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {_kind(value)}")
    if len(value) > MAX_NAME_CHARS:
        raise InvalidInput(f"{what} {shown(value)} is too long (at most {MAX_NAME_CHARS} characters)")
    return value


def parse_json(text: bytes | memoryview, what: str = "the request body") -> dict:
    """A JSON object; anything else (malformed, nested deeper than 1024 levels, not an object) is refused."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None
    return _object(value, what)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes | memoryview, memoryview]:
    """The JSON part and the binary part of a body, as `Inference-Header-Content-Length` splits it."""
    view = memoryview(body)
    if header_length is None:
        return view, view[len(view):]
    text = header_length.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got {shown(header_length)}")
    n = int(text)
    if n > len(view):
        raise InvalidInput(f"{HEADER_LENGTH} is {n} but the body holds {len(view)} bytes")
    return view[:n], view[n:]


# -- parameters -------------------------------------------------------------------------------------------------

def set_parameters(target, params, what: str, skip: tuple[str, ...] = ()) -> None:
    """JSON parameters into a map of InferParameter: booleans, integers, numbers and strings."""
    if params is None:
        return
    for key, value in _object(params, f"{what} parameters").items():
        if key in skip:
            continue
        _string(key, f"{what} parameter name")
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if not -(1 << 63) <= value < (1 << 63):
                raise InvalidInput(f"{what} parameter {shown(key)} is out of the int64 range")
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        elif isinstance(value, str):
            p.string_param = value
        else:
            raise InvalidInput(f"{what} parameter {shown(key)} must be a boolean, number or string, got {_kind(value)}")


def parameters_json(params) -> dict:
    """A map of InferParameter as JSON values."""
    out = {}
    for key, p in params.items():
        kind = p.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(p, kind)
    return out


def _flag(params: dict | None, key: str, what: str) -> bool | None:
    if not params or key not in params:
        return None
    value = params[key]
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} parameter {key!r} must be true or false, got {_kind(value)}")
    return value


# -- requests ---------------------------------------------------------------------------------------------------

def _shape(value, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise InvalidInput(f"{what} shape must be an array of at most {MAX_DIMS} integers")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < (1 << 40):
            raise InvalidInput(f"{what} shape {value} must hold non-negative integers")
    return value


def _json_tensor_bytes(data, datatype: str, count: int, what: str) -> bytes:
    """JSON data (flat or nested, row-major) as the raw bytes of its datatype."""
    if datatype == "BYTES":
        items = _flat(data, what)
        if len(items) != count:
            raise InvalidInput(f"{what} holds {len(items)} elements in data, its shape needs {count}")
        for x in items:
            if not isinstance(x, str):
                raise InvalidInput(f"{what}: BYTES elements in JSON are strings, got {_kind(x)} (send encoded "
                                   "images as binary data: Triton's binary tensor extension)")
        return serialize_bytes([x.encode() for x in items])
    np_type = NUMPY_TYPES.get(datatype)
    if np_type is None:
        raise InvalidInput(f"{what} datatype {shown(datatype)} cannot be given as JSON data; the datatypes are "
                           f"{', '.join([*NUMPY_TYPES, 'BYTES'])}")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{what} data is not a regular array of numbers (rows of different lengths?)") from None
    if values.size != count:
        raise InvalidInput(f"{what} holds {values.size} values in data, its shape needs {count}")
    if count and values.dtype.kind not in "biuf":
        raise InvalidInput(f"{what} data must hold only numbers{' or booleans' if datatype == 'BOOL' else ''}, "
                           f"got {values.dtype.kind == 'O' and 'mixed values' or 'strings'}")
    if np_type.kind in "iub" and count:
        if values.dtype.kind == "f":
            raise InvalidInput(f"{what} is {datatype}: its data must be integers")
        info = np.iinfo(np_type) if np_type.kind != "b" else None
        if info is not None and (values.min() < info.min or values.max() > info.max):
            raise InvalidInput(f"{what} holds values outside the {datatype} range {info.min}..{info.max}")
        if np_type.kind == "b" and values.dtype.kind != "b":
            raise InvalidInput(f"{what} is BOOL: its data must be true or false")
    with np.errstate(over="ignore"):  # an FP16 value past 65504 becomes infinity, as a cast in C does
        return np.ascontiguousarray(values.reshape(-1), np_type).tobytes()


def _flat(data, what: str) -> list:
    if not isinstance(data, list):
        raise InvalidInput(f"{what} data must be an array, got {_kind(data)}")
    out, stack = [], [iter(data)]
    while stack:  # iterative: orjson bounds the nesting, this keeps Python's stack out of it anyway
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def infer_request(header: dict, binary: memoryview, model: str, version: str) -> InferBody:
    """The ModelInferRequest of a REST infer body (its JSON already parsed, its binary part apart)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if "id" in header:
        request.id = _string(header["id"], "id")
    params = header.get("parameters")
    all_binary = bool(_flag(params, BINARY_DATA_OUTPUT, "request"))
    set_parameters(request.parameters, params, "request", skip=(BINARY_DATA_OUTPUT,))
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request must have `inputs`: an array of tensors {name, shape, datatype, data}")
    offset = 0
    for i, tensor in enumerate(inputs):
        tensor = _object(tensor, f"inputs[{i}]")
        name = _string(tensor.get("name"), f"inputs[{i}].name")
        what = f"input {shown(name)}"
        datatype = _string(tensor.get("datatype"), f"{what} datatype")
        shape = _shape(tensor.get("shape"), what)
        count = math.prod(shape)
        t = request.inputs.add(name=name, datatype=datatype, shape=shape)
        tparams = tensor.get("parameters")
        size = tparams.get(BINARY_DATA_SIZE) if isinstance(tparams, dict) else None
        set_parameters(t.parameters, tparams, what, skip=(BINARY_DATA_SIZE,))
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"{what} {BINARY_DATA_SIZE} must be a non-negative integer")
            if "data" in tensor:
                raise InvalidInput(f"{what} has both data and {BINARY_DATA_SIZE}; send one")
            if offset + size > len(binary):
                raise InvalidInput(f"{what} {BINARY_DATA_SIZE} {size} runs past the binary data "
                                   f"({len(binary) - offset} bytes left of {len(binary)})")
            request.raw_input_contents.append(bytes(binary[offset:offset + size]))
            offset += size
        elif "data" in tensor:
            request.raw_input_contents.append(_json_tensor_bytes(tensor["data"], datatype, count, what))
        else:
            raise InvalidInput(f"{what} has neither data nor the parameter {BINARY_DATA_SIZE}")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the inputs' {BINARY_DATA_SIZE}s "
                           f"({offset} bytes); the sizes must add up to the binary part")
    binary_outputs, json_outputs = set(), set()
    outputs = header.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInput(f"outputs must be an array, got {_kind(outputs)}")
        for i, o in enumerate(outputs):
            o = _object(o, f"outputs[{i}]")
            name = _string(o.get("name"), f"outputs[{i}].name")
            oparams = o.get("parameters")
            flag = _flag(oparams, BINARY_DATA, f"output {shown(name)}")
            (binary_outputs if flag else json_outputs if flag is False else set()).add(name)
            out = request.outputs.add(name=name)
            set_parameters(out.parameters, oparams, f"output {shown(name)}", skip=(BINARY_DATA,))
    return InferBody(request, binary_outputs, all_binary, json_outputs)


# -- responses --------------------------------------------------------------------------------------------------

def infer_response(response: pb.ModelInferResponse, body: InferBody) -> tuple[bytes, int | None]:
    """The REST body of a ModelInferResponse, and the JSON part's length when binary data follows it."""
    outputs, blobs = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        out = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        params = parameters_json(tensor.parameters)
        binary = tensor.name in body.binary_outputs or (body.all_binary and tensor.name not in body.json_outputs)
        if binary:
            params[BINARY_DATA_SIZE] = len(raw)
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            out["data"] = [b.decode("utf-8", "replace") for b in deserialize_bytes(raw)]
        else:
            out["data"] = np.frombuffer(raw, NUMPY_TYPES[tensor.datatype])
        if params:
            out["parameters"] = params
        outputs.append(out)
    head = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        head["id"] = response.id
    if response.parameters:
        head["parameters"] = parameters_json(response.parameters)
    head["outputs"] = outputs
    text = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


# -- other messages ---------------------------------------------------------------------------------------------

def message_json(message) -> dict:
    """A protobuf message as Triton's REST API writes it: field names as in the .proto, 64-bit integers as
    numbers (perf_analyzer reads them so), enums by name, unset sub-messages left out."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name) != field.name:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _field_json(value_field, v) for k, v in value.items()}
        elif field.label == field.LABEL_REPEATED:
            out[field.name] = [_field_json(field, v) for v in value]
        elif field.message_type is not None:
            if message.HasField(field.name):
                out[field.name] = message_json(value)
        else:
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field, value):
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        v = field.enum_type.values_by_number.get(value)
        return v.name if v is not None else value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def dumps(value) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
