"""KServe v2 messages <-> the server's typed request and result: input tensors, requested outputs,
request parameters, Triton's BYTES layout and classification strings.

Inputs: one tensor named like the model input, FP32 / FP16 / UINT8 [N, C, H, W] (UINT8 pixels are scaled
by 1/255) or BYTES [N] holding encoded PNG/JPEG images (decoded and resized like classifier.v1), given in
`raw_input_contents` or in typed `contents`. Nothing is converted here: the tensor's bytes travel to the
batch worker as an `ImageBatch`, where the engine checks and converts them with every other input. Float
inputs go to the model as sent, NaN and infinities included, as Triton does (the model's answer is then
NaN, never a guess). Outputs: `logits`, `features`, `probabilities` and `cam` ([N, H, W]), always in
`raw_output_contents`, which is where Triton's clients read numeric data. The `classification` parameter
of a requested output turns it into BYTES top-k strings "score:index:label", as Triton does.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass

import numpy as np

from ....engine.errors import InvalidInput, shown
from ....engine.inference import MODEL_INPUT_BATCH, ImageBatch, InferenceRequest, InferenceResult, element_count
from ....wire.inference import grpc_service_pb2 as pb
from ...model import ModelVersion
from .metadata import CAM, PROBABILITIES, input_shape, output_specs

# KServe's names of the numeric input datatypes, as the engine names them (`engine/decode.DTYPES`, where
# they are checked and converted); FP16 has no typed contents field.
KSERVE_DTYPES = {"FP32": "float32", "FP16": "float16", "UINT8": "uint8"}
_TYPED_FIELD = {"FP32": "fp32_contents", "UINT8": "uint_contents", "BYTES": "bytes_contents"}


MAX_INT_DIGITS = 18


def parse_version(version: str) -> int:
    """Triton versions are strings; empty means the one the version policy serves (the newest ready)."""
    if not version:
        return 0
    # At most 18 digits: a version is an int64, and int() refuses strings of over 4,300 digits with a
    # ValueError that would otherwise surface as INTERNAL.
    if len(version) > MAX_INT_DIGITS or not (version.isascii() and version.isdigit()):  # isdigit alone takes "²"
        raise InvalidInput(f"model version {shown(version)} is not a non-negative integer of at most "
                           f"{MAX_INT_DIGITS} digits")
    return int(version)


def int_param(params, key: str) -> int | None:
    if key not in params:
        return None
    p = params[key]
    kind = p.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param"):
        return int(getattr(p, kind))
    if kind == "double_param" and float(p.double_param).is_integer():
        return int(p.double_param)
    text = p.string_param
    if kind == "string_param" and len(text) <= MAX_INT_DIGITS + 1 and text.isascii() and text.lstrip("-").isdigit():
        return int(text)
    raise InvalidInput(f"parameter {key!r} must be an integer, got {kind or 'nothing'}")


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES wire layout: each element is a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidInput(f"BYTES tensor is truncated: {len(raw) - offset} stray bytes at offset {offset}")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InvalidInput(f"BYTES element {len(items)} claims {n} bytes but only {len(raw) - offset} remain")
        items.append(bytes(raw[offset:offset + n]))
        offset += n
    return items


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def inference_request(request: pb.ModelInferRequest, mv: ModelVersion) -> tuple[InferenceRequest, list[Output]]:
    """A ModelInfer request as the typed request the batcher queues, and the outputs to answer with."""
    images = input_images(request, mv)
    outputs = requested_outputs(request, mv)
    cam = next((o for o in outputs if o.name == CAM), None)
    target_class = None
    if cam is not None:
        target_class = cam.target_class if cam.target_class is not None else int_param(request.parameters, "cam_class")
    features = any(o.name == mv.spec.features_output for o in outputs)
    return InferenceRequest(images, cam=cam is not None, target_class=target_class, features=features,
                            finite_only=False), outputs


def input_images(request: pb.ModelInferRequest, mv: ModelVersion) -> ImageBatch | list[bytes]:
    """The request's one input as wire-level images: one `ImageBatch` [N, C, H, W] of the tensor's bytes (the
    batch worker checks and converts them, straight into its buffer), or the encoded images of a BYTES tensor."""
    spec = mv.spec
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {spec.name} takes exactly one input ({spec.input_name!r}), "
                           f"the request has {len(request.inputs)}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs; "
                           "send one per input or none")
    tensor = request.inputs[0]
    if tensor.name != spec.input_name:
        raise InvalidInput(f"unexpected input {shown(tensor.name)} for model {spec.name}; its input is {spec.input_name!r}")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    if raw is not None and tensor.contents.ByteSize():
        raise InvalidInput(f"input {shown(tensor.name)} has both raw_input_contents and contents; send one")
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {shown(tensor.name)} shape {shape} has a negative dimension")
    dtype = tensor.datatype
    if dtype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"BYTES input {shown(tensor.name)} has shape {shape}; send [N] or [N, 1] encoded images")
        items = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
        if len(items) != element_count(shape):
            raise InvalidInput(f"BYTES input {shown(tensor.name)} holds {len(items)} elements, shape {shape} "
                               f"needs {element_count(shape)}")
        return items
    if dtype not in KSERVE_DTYPES:
        raise InvalidInput(f"input {shown(tensor.name)} datatype {shown(dtype)} is not supported; "
                           "use FP32, FP16, UINT8 ([N, C, H, W]) or BYTES (encoded images)")
    expected = input_shape(mv)
    if len(shape) != 4 or shape[1:] != expected[1:]:
        raise InvalidInput(f"input {shown(tensor.name)} has shape {shape}, but model {spec.name} expects {expected} "
                           f"(N, C, H, W) for {dtype}")
    if raw is None:
        raw = _typed_contents(tensor, dtype, element_count(shape))
    return ImageBatch(tuple(shape), KSERVE_DTYPES[dtype], raw, MODEL_INPUT_BATCH)


def _typed_contents(tensor: pb.ModelInferRequest.InferInputTensor, dtype: str, count: int) -> bytes:
    """A tensor sent in typed `contents` as the little-endian bytes raw_input_contents would have held."""
    field = _TYPED_FIELD.get(dtype)
    if field is None:
        raise InvalidInput(f"{dtype} input {shown(tensor.name)} must be sent in raw_input_contents "
                           "(the protocol has no typed contents for it)")
    typed = getattr(tensor.contents, field)
    if len(typed) != count:
        raise InvalidInput(f"input {shown(tensor.name)} has {len(typed)} values in contents.{field}, "
                           f"shape {list(tensor.shape)} needs {count}")
    if dtype == "UINT8":
        try:
            return bytes(typed)  # uint_contents is 32-bit
        except ValueError:
            raise InvalidInput(f"UINT8 input {shown(tensor.name)} holds values outside 0..255") from None
    values = array.array("f", typed)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


@dataclass
class Output:
    """One requested output: its name, top-k for classification (0 = the tensor itself), CAM target."""
    name: str
    classification: int = 0
    target_class: int | None = None


def requested_outputs(request: pb.ModelInferRequest, mv: ModelVersion) -> list[Output]:
    spec = mv.spec
    names = [o.name for o in output_specs(mv)]
    if not request.outputs:
        return [Output(spec.logits_output)]  # KServe: no outputs asked for means every output; ours is logits
    outputs, seen = [], set()
    for o in request.outputs:
        if o.name not in names and o.name != CAM:  # CAM on a model without it fails below with the reason
            raise InvalidInput(f"unknown output {shown(o.name)} for model {spec.name}; outputs: {', '.join(names)}")
        if o.name in seen:
            raise InvalidInput(f"output {shown(o.name)} is requested twice")
        seen.add(o.name)
        k = int_param(o.parameters, "classification") or 0
        if k < 0:
            raise InvalidInput(f"classification count {k} for output {shown(o.name)} is negative")
        if k and o.name not in (spec.logits_output, PROBABILITIES):
            raise InvalidInput(f"classification applies to logits or probabilities, not to the {shown(o.name)} output")
        outputs.append(Output(o.name, k, int_param(o.parameters, "cam_class")))
    return outputs


def _classification(values: np.ndarray, k: int, labels: list[str], ranking: np.ndarray | None = None) -> np.ndarray:
    """Triton's classification strings "score:index[:label]", top-k per row by value. The batch's ranking of
    probabilities is also that of the logits (softmax keeps the order), so it is reused where it fits."""
    k = min(k, values.shape[1])
    fits = ranking is not None and ranking.shape == values.shape
    order = ranking[:, :k] if fits else np.argsort(-values, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(values, order, axis=1)
    use_labels = len(labels) == values.shape[1]
    return np.array([[f"{scores[r, j]:f}:{i}" + (f":{labels[i]}" if use_labels else "")
                      for j, i in enumerate(row)] for r, row in enumerate(order.tolist())], dtype=object)


def build_response(request: pb.ModelInferRequest, mv: ModelVersion, result: InferenceResult,
                   outputs: list[Output]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=mv.name, model_version=str(mv.version), id=request.id)
    for o in outputs:
        if o.name == CAM:
            values = result.cams
        elif o.name == PROBABILITIES:
            values = result.probabilities  # computed once per batch in the worker thread
        elif o.name == mv.spec.features_output:
            values = result.features
        else:
            values = result.logits
        tensor = response.outputs.add(name=o.name)
        if o.classification:
            strings = _classification(values, o.classification, mv.spec.labels, result.ranking)
            tensor.datatype, tensor.shape[:] = "BYTES", list(strings.shape)
            response.raw_output_contents.append(serialize_bytes([s.encode() for s in strings.ravel()]))
            continue
        tensor.datatype, tensor.shape[:] = "FP32", list(values.shape)
        response.raw_output_contents.append(np.ascontiguousarray(values, "<f4").tobytes())
        if o.name == CAM:
            # Which class each map explains (the predicted one unless cam_class was given).
            tensor.parameters["cam_class"].string_param = ",".join(map(str, result.target_classes.tolist()))
    return response
