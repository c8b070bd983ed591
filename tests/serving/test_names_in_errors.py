"""A caller's names in the server's error messages: a model name, version string, input or output name or
datatype of any length is echoed cut to 64 characters with its full length (`errors.shown`), on both APIs,
and control characters in it are escaped, so an error answer (and its log line) stays one short line."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from serving.engine.errors import SHOWN_NAME_CHARS, shown
from serving.wire.classifier.v1 import classifier_pb2 as cpb
from serving.wire.classifier.v1 import classifier_pb2_grpc as cpb_grpc
from serving.wire.inference import grpc_service_pb2 as kpb
from serving.wire.inference import grpc_service_pb2_grpc as kpb_grpc

LONG = 5000
BOUND = 400  # the longest message any of these answers may be: the cut name and the rest of the sentence


def test_shown_cuts_past_the_limit_and_says_the_length():
    assert shown("fmnist") == "'fmnist'"
    at_limit = "m" * SHOWN_NAME_CHARS
    assert shown(at_limit) == repr(at_limit)
    assert shown(at_limit + "m") == f"{at_limit!r}... ({SHOWN_NAME_CHARS + 1} characters)"
    assert shown("a\nb\x00") == "'a\\nb\\x00'"  # one line, whatever the name holds


@pytest.fixture(scope="module")
def stubs(server):
    with grpc.insecure_channel(server.address) as channel:
        yield cpb_grpc.ClassifierStub(channel), kpb_grpc.GRPCInferenceServiceStub(channel)


def _pixels() -> cpb.Image:
    return cpb.Image(tensor=cpb.Tensor(shape=[28, 28], dtype="uint8", data=bytes(28 * 28)))


def _infer(model: str = "fmnist", version: str = "", name: str = "input", datatype: str = "UINT8",
           output: str = "logits") -> kpb.ModelInferRequest:
    tensor = kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1, 1, 28, 28])
    return kpb.ModelInferRequest(model_name=model, model_version=version, inputs=[tensor],
                                 raw_input_contents=[np.zeros(28 * 28, np.uint8).tobytes()],
                                 outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=output)])


def _calls(classifier, kserve):
    """(what is named, the call, its status): each call names one thing LONG characters long."""
    name = "n" * LONG
    return [
        ("Classify model", lambda: classifier.Classify(cpb.ClassifyRequest(model=name, images=[_pixels()])),
         grpc.StatusCode.NOT_FOUND),
        ("GetModel model", lambda: classifier.GetModel(cpb.GetModelRequest(model=name)), grpc.StatusCode.NOT_FOUND),
        ("tensor dtype", lambda: classifier.Classify(cpb.ClassifyRequest(images=[cpb.Image(
            tensor=cpb.Tensor(shape=[28, 28], dtype=name, data=bytes(28 * 28)))])), grpc.StatusCode.INVALID_ARGUMENT),
        ("ModelMetadata name", lambda: kserve.ModelMetadata(kpb.ModelMetadataRequest(name=name)),
         grpc.StatusCode.NOT_FOUND),
        ("ModelInfer model", lambda: kserve.ModelInfer(_infer(model=name)), grpc.StatusCode.NOT_FOUND),
        ("ModelInfer version", lambda: kserve.ModelInfer(_infer(version="v" + name)), grpc.StatusCode.INVALID_ARGUMENT),
        ("ModelInfer input", lambda: kserve.ModelInfer(_infer(name=name)), grpc.StatusCode.INVALID_ARGUMENT),
        ("ModelInfer datatype", lambda: kserve.ModelInfer(_infer(datatype=name)), grpc.StatusCode.INVALID_ARGUMENT),
        ("ModelInfer output", lambda: kserve.ModelInfer(_infer(output=name)), grpc.StatusCode.INVALID_ARGUMENT),
        ("RepositoryModelLoad", lambda: kserve.RepositoryModelLoad(kpb.RepositoryModelLoadRequest(model_name=name)),
         grpc.StatusCode.NOT_FOUND),
        ("RepositoryModelUnload", lambda: kserve.RepositoryModelUnload(
            kpb.RepositoryModelUnloadRequest(model_name=name)), grpc.StatusCode.NOT_FOUND),
    ]


def test_a_long_name_is_echoed_cut_with_its_length_on_both_apis(stubs):
    for what, call, code in _calls(*stubs):
        with pytest.raises(grpc.RpcError) as err:
            call()
        details = err.value.details()
        assert err.value.code() == code, (what, err.value.code(), details[:200])
        assert f"... ({LONG + (what == 'ModelInfer version')} characters)" in details, (what, details[:200])
        assert len(details) < BOUND, (what, len(details))


def test_a_short_name_is_echoed_whole_and_escaped(stubs):
    classifier, kserve = stubs
    with pytest.raises(grpc.RpcError) as err:
        classifier.Classify(cpb.ClassifyRequest(model="no\nsuch", images=[_pixels()]))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details().startswith("model 'no\\nsuch' is not in the repository (models: fmnist)")
    with pytest.raises(grpc.RpcError) as err:
        kserve.ModelInfer(_infer(version="latest"))
    assert err.value.details() == "model version 'latest' is not a non-negative integer of at most 18 digits"
