"""Property-based tests: generated malformed requests of both APIs (shapes, dtypes, byte counts, parameters,
names, image bytes) against the running server. Whatever a client sends, the server stays up, answers within
a bound, never blames itself (INTERNAL or UNKNOWN) for the client's mistake, and its memory stays bounded.

The examples are derandomized (the same cases on every run, so CI cannot flake on a new one) and bounded:
CASES below, in total, about 20 s here. `HYPOTHESIS_PROFILE=explore` runs ten times as many, random.
"""

from __future__ import annotations

import io
import os
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.wire.classifier.v1 import classifier_pb2 as cpb
from serving.wire.classifier.v1 import classifier_pb2_grpc as cpb_grpc
from serving.wire.inference import grpc_service_pb2 as kpb
from serving.wire.inference import grpc_service_pb2_grpc as kpb_grpc

CASES = {"classifier": 70, "kserve": 70, "classifier_stream": 30, "kserve_stream": 30}  # 200 generated cases
ANSWER_BOUND_S = 5.0       # the longest any answer may take (the client's deadline is twice that)
RSS_GROWTH_BOUND_MB = 150  # the whole process (server and client) over all the cases

settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 1

# A client's mistake gets one of these; the server's own faults (INTERNAL, UNKNOWN) and a server that went
# away (UNAVAILABLE, CANCELLED) never answer a malformed request.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED}
counted = {name: 0 for name in CASES}
answered: dict[str, int] = {}  # status code -> answers, over every request and stream item


def tally(code: grpc.StatusCode) -> None:
    answered[code.name] = answered.get(code.name, 0) + 1


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        start = rss_mb()
        yield ch
        grown = rss_mb() - start
        total = sum(counted.values())
        print(f"\n{total} generated hostile requests {counted}; answers {answered}; RSS {start:.0f} -> "
              f"{start + grown:.0f} MB ({grown:+.1f} MB)")
        assert grown < RSS_GROWTH_BOUND_MB
        # Still up and right.
        ok = cpb_grpc.ClassifierStub(ch).Classify(cpb.ClassifyRequest(images=[cpb.Image(
            tensor=cpb.Tensor(shape=[28, 28], dtype="uint8", data=bytes(784)))]), timeout=10)
        assert len(ok.results) == 1


def timed(call, *args, allowed=CLIENT_ERRORS | {grpc.StatusCode.OK}):
    started = time.monotonic()
    try:
        response, code, details = call(*args, timeout=2 * ANSWER_BOUND_S), grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        response, code, details = None, e.code(), e.details()
    elapsed = time.monotonic() - started
    tally(code)
    assert code in allowed, (code, details)
    assert elapsed < ANSWER_BOUND_S, (elapsed, code, details)
    return response


# -- building blocks -------------------------------------------------------------------------------------------
HUGE = [2**31 - 1, 2**31, 2**32 + 1, 2**62, 2**63 - 1, -(2**63), -1]
dims = st.integers(-2, 40) | st.sampled_from(HUGE + [28, 3, 1, 0])
shapes = st.lists(dims, max_size=5)


def valid_or(valid: list, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly (three times in four) a valid value, so that the checks behind this one are reached too."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid), hostile)


model_names = valid_or(["fmnist", ""], st.sampled_from(["../fmnist", "fmnist/../../etc/passwd", "/etc/passwd", "FMNIST",
                                                         "fmnist\x00", "fmnist ", "%2e%2e/fmnist", "a" * 300])
                       | st.text(max_size=20))
versions = valid_or([0, 1], st.sampled_from([2, -1, 2**31, 2**63 - 1, -(2**63)]) | st.integers(-(2**63), 2**63 - 1))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@st.composite
def declared_huge_png(draw) -> bytes:
    """A PNG whose header claims an enormous image (a decompression bomb's header) over a few bytes of data."""
    w, h = draw(st.sampled_from([(100_000, 100_000), (8000, 8000), (2**31 - 1, 1), (1, 2**31 - 1), (0, 0)]))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, draw(st.sampled_from([0, 2, 6])), 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


@st.composite
def encoded_image(draw) -> bytes:
    """A real PNG or JPEG of some size and mode, sometimes truncated or with a flipped byte."""
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1"]))
    fmt = "JPEG" if mode in ("L", "RGB") and draw(st.booleans()) else "PNG"
    buf = io.BytesIO()
    Image.new(mode, (w, h), draw(st.integers(0, 255))).save(buf, format=fmt)
    data = bytearray(buf.getvalue())
    damage = draw(st.sampled_from(["none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 0xFF
    return bytes(data)


@st.composite
def raw_tensor(draw) -> cpb.Tensor:
    """A classifier.v1 tensor: often a plausible shape and dtype with exactly the right byte count (so the
    checks after the byte count are reached), otherwise anything."""
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(1, 48), min_size=1, max_size=4))
        dtype = draw(st.sampled_from(["uint8", "float32", "float16"]))
        size = int(np.prod(shape)) * {"uint8": 1, "float32": 4, "float16": 2}[dtype]
        if size <= 64 * 1024:
            return cpb.Tensor(shape=shape, dtype=dtype, data=draw(st.binary(min_size=size, max_size=size)))
    dtype = draw(st.sampled_from(["uint8", "float32", "float16", "float64", "int8", "", "UINT8"]) | st.text(max_size=8))
    return cpb.Tensor(shape=draw(shapes), dtype=dtype, data=draw(st.binary(max_size=2048)))


images = st.one_of(
    st.builds(lambda b: cpb.Image(encoded=b), st.binary(max_size=512)) | st.just(cpb.Image()),
    st.builds(lambda b: cpb.Image(encoded=b), encoded_image()),
    st.builds(lambda b: cpb.Image(encoded=b), declared_huge_png()),
    st.builds(lambda t: cpb.Image(tensor=t), raw_tensor()),
    st.builds(lambda t: cpb.Image(tensor=t), raw_tensor()),
)


@st.composite
def classifier_request(draw):
    kind = draw(st.sampled_from(["Classify", "Explain"]))
    count = draw(st.sampled_from([1, 1, 2, 4, 0]))
    common = dict(model=draw(model_names), version=draw(versions), images=draw(st.lists(images, min_size=count,
                                                                                        max_size=count)))
    if kind == "Classify":
        return kind, cpb.ClassifyRequest(top_k=draw(st.integers(-(2**31), 2**31 - 1)), **common)
    request = cpb.ExplainRequest(overlay=draw(st.booleans()), **common)
    if draw(st.booleans()):
        request.target_class = draw(st.integers(-(2**31), 2**31 - 1))
    return kind, request


@st.composite
def parameter(draw) -> kpb.InferParameter:
    kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]))
    value = {"bool_param": st.booleans(), "int64_param": st.integers(-(2**63), 2**63 - 1),
             "string_param": st.text(max_size=12) | st.sampled_from(["1", "-1", "99999999999999999999999"]),
             "double_param": st.floats(allow_nan=True), "uint64_param": st.integers(0, 2**64 - 1)}[kind]
    return kpb.InferParameter(**{kind: draw(value)})


def parameters(keys: list[str], hostile_keys: list[str] = ()):
    return st.dictionaries(valid_or(keys, st.sampled_from([*hostile_keys, ""]) | st.text(max_size=8)), parameter(),
                           max_size=3)


@st.composite
def infer_input(draw) -> tuple[kpb.ModelInferRequest.InferInputTensor, bytes | None]:
    datatype = draw(valid_or(["FP32", "FP16", "UINT8", "BYTES"],
                             st.sampled_from(["INT8", "FP64", "BOOL", "fp32", ""]) | st.text(max_size=6)))
    if draw(st.sampled_from([True, True, True, False])):  # plausible: the model's own shape, or [N] for BYTES
        n = draw(st.integers(0, 3))
        shape = [n] if datatype == "BYTES" else [n, 1, 28, 28]
    else:
        shape = draw(shapes)
    name = draw(valid_or(["input"], st.sampled_from(["INPUT", ""]) | st.text(max_size=8)))
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    itemsize = {"FP32": 4, "FP16": 2, "UINT8": 1}.get(datatype, 1)
    plausible = int(np.prod(shape, dtype=object)) * itemsize if all(0 <= d <= 4096 for d in shape) else -1
    contents = draw(st.sampled_from(["raw_exact", "raw_exact", "raw_any", "typed", "bytes", "none"]))
    if contents == "raw_exact" and datatype == "BYTES" and len(shape) == 1 and 0 <= shape[0] <= 4:
        items = draw(st.lists(encoded_image() | st.binary(max_size=32), min_size=shape[0], max_size=shape[0]))
        return tensor, b"".join(struct.pack("<I", len(x)) + x for x in items)  # Triton's BYTES layout
    if contents == "raw_exact" and 0 <= plausible <= 32 * 1024:
        return tensor, draw(st.binary(min_size=plausible, max_size=plausible))
    if contents == "raw_any":
        return tensor, draw(st.binary(max_size=4096))
    if contents == "typed":
        tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=64)))
        tensor.contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=64)))
    if contents == "bytes":
        tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=64) | encoded_image(), max_size=3)))
    return tensor, None


@st.composite
def infer_request(draw) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(
        model_name=draw(model_names),
        model_version=draw(valid_or(["", "1"], st.sampled_from(["2", "-1", "abc", "99999999999999999999", " 1", "\u00b2"])
                                    | st.text(max_size=4))),
        id=draw(st.text(max_size=8)))
    raws = []
    count = draw(st.sampled_from([1, 1, 1, 0, 2]))
    for tensor, raw in draw(st.lists(infer_input(), min_size=count, max_size=count)):
        request.inputs.append(tensor)
        raws.append(raw)
    if any(r is not None for r in raws) and draw(st.sampled_from([True, True, True, False])):
        request.raw_input_contents.extend(r or b"" for r in raws)
    for key, value in draw(parameters(["priority", "timeout", "cam_class"], ["sequence_id"])).items():
        request.parameters[key].CopyFrom(value)
    for name in draw(st.lists(st.sampled_from(["logits", "probabilities", "cam", "features", "nope", ""]), max_size=3)):
        output = request.outputs.add(name=name)
        for key, value in draw(parameters(["classification", "cam_class"])).items():
            output.parameters[key].CopyFrom(value)
    return request


def kserve_allowed(request: kpb.ModelInferRequest) -> set:
    allowed = CLIENT_ERRORS | {grpc.StatusCode.OK}
    if "timeout" in request.parameters:  # a client's own tiny timeout may pass while queued
        allowed |= {grpc.StatusCode.DEADLINE_EXCEEDED}
    return allowed


# -- the properties --------------------------------------------------------------------------------------------
@settings(max_examples=CASES["classifier"] * SCALE)
@given(classifier_request())
def test_classifier_v1_malformed_requests(channel, case):
    kind, request = case
    counted["classifier"] += 1
    timed(getattr(cpb_grpc.ClassifierStub(channel), kind), request)


@settings(max_examples=CASES["kserve"] * SCALE)
@given(infer_request())
def test_kserve_malformed_requests(channel, request):
    counted["kserve"] += 1
    timed(kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, request, allowed=kserve_allowed(request))


@settings(max_examples=CASES["classifier_stream"] * SCALE)
@given(st.lists(classifier_request().map(lambda case: case[1]).filter(lambda r: isinstance(r, cpb.ClassifyRequest)),
                min_size=1, max_size=4))
def test_classifier_stream_malformed_items(channel, requests):
    """Each bad item is answered with its own status, in order, and the stream goes on."""
    counted["classifier_stream"] += 1
    started = time.monotonic()
    items = [cpb.StreamClassifyRequest(request_id=str(i), request=r) for i, r in enumerate(requests)]
    answers = list(cpb_grpc.ClassifierStub(channel).ClassifyStream(iter(items), timeout=2 * ANSWER_BOUND_S))
    assert time.monotonic() - started < ANSWER_BOUND_S
    assert [a.request_id for a in answers] == [str(i) for i in range(len(items))]
    codes = {c.value[0]: c for c in grpc.StatusCode}
    for a in answers:
        tally(codes[a.error_code])
        assert not a.error_code or codes[a.error_code] in CLIENT_ERRORS, (codes[a.error_code], a.error_message)


@settings(max_examples=CASES["kserve_stream"] * SCALE)
@given(st.lists(infer_request(), min_size=1, max_size=4))
def test_kserve_stream_malformed_items(channel, requests):
    counted["kserve_stream"] += 1
    started = time.monotonic()
    answers = list(kpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests),
                                                                                timeout=2 * ANSWER_BOUND_S))
    assert time.monotonic() - started < ANSWER_BOUND_S
    assert len(answers) == len(requests)
    for request, a in zip(requests, answers):
        assert a.infer_response.id == request.id
        code = grpc.StatusCode.OK
        if a.error_message:
            code = grpc.StatusCode[a.error_message.split("]", 1)[0].removeprefix("[StatusCode.")]
        tally(code)
        assert code in kserve_allowed(request), a.error_message
