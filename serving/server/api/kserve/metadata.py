"""What ModelMetadata and ModelConfig say about a model version, built from one list of outputs, so that
both answers name the same tensors (Triton's tools, perf_analyzer among them, read both and require them to
agree).

The outputs are the model file's own (`logits`, `features`) and the two the server computes
(`probabilities`, and `cam` where the version can explain). config.pbtxt on disk keeps only the model
file's outputs, so that Triton itself can still serve the repository unchanged; the served ModelConfig
adds the computed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from ....repository_format import PLATFORM
from ....wire.inference import grpc_service_pb2 as pb
from ....wire.inference import model_config_pb2 as mc
from ...model import ModelVersion

PROBABILITIES, CAM = "probabilities", "cam"
# Every input datatype ModelInfer accepts. Triton's metadata has one datatype per input, so the tensor is
# listed as FP32 (the model's own type, which tools generate data for) and the others are named in the
# served ModelConfig's parameters, where Triton keeps model-specific settings.
ACCEPTED_INPUT_DATATYPES = ("FP32", "FP16", "UINT8", "BYTES")
INPUT_DATATYPES_PARAMETER = "accepted_input_datatypes"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension
    datatype: str = "FP32"


def output_specs(mv: ModelVersion) -> list[TensorSpec]:
    spec, pre = mv.spec, mv.spec.preprocessing
    outputs = [TensorSpec(spec.logits_output, tuple(spec.logits_shape))]
    if spec.features_output:
        outputs.append(TensorSpec(spec.features_output, tuple(spec.output_dims(spec.features_output))))
    outputs.append(TensorSpec(PROBABILITIES, (spec.num_classes,)))
    if mv.supports_cam:
        outputs.append(TensorSpec(CAM, (pre.height, pre.width)))
    return outputs


def input_shape(mv: ModelVersion) -> list[int]:
    pre = mv.spec.preprocessing
    return [-1, pre.channels, pre.height, pre.width]


def model_metadata(mv: ModelVersion, versions: list[int]) -> pb.ModelMetadataResponse:
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=mv.name, versions=[str(v) for v in versions], platform=PLATFORM,
        inputs=[tensor(name=mv.spec.input_name, datatype="FP32", shape=input_shape(mv))],
        outputs=[tensor(name=o.name, datatype=o.datatype, shape=[-1, *o.dims]) for o in output_specs(mv)])


def served_config(mv: ModelVersion) -> mc.ModelConfig:
    """The config.pbtxt of the version, with the computed outputs and the accepted input datatypes added."""
    config = mc.ModelConfig()
    config.CopyFrom(mv.spec.config)
    on_disk = {o.name for o in config.output}
    for o in output_specs(mv):
        if o.name not in on_disk:
            config.output.add(name=o.name, data_type=mc.TYPE_FP32, dims=list(o.dims))
    config.parameters[INPUT_DATATYPES_PARAMETER].string_value = ",".join(ACCEPTED_INPUT_DATATYPES)
    return config
