"""`export --all` for one model of every family and head type, served by the real server: Classify and
Explain for each, with no model-specific code in export or serving."""

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from tests.conftest import running_server
from training.__main__ import main as training_main

# Every family, both head types where a family has two; the 224-sized classic heads are left to the
# parameter-count tests (their ONNX files are hundreds of MB).
MODELS = ["linear", "mlp", "lenet5", "lenet5_gap", "alexnet_gap", "vgg11_gap", "resnet18", "resnet20", "small_fmnist"]
NO_CAM = {"mlp": "hidden layers are nonlinear", "lenet5": "use head='gap'"}


@pytest.fixture(scope="module")
def range_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("range")
    training_main(["export", "--all", "--models", ",".join(MODELS), "--model-repository", str(repo), "--max-batch-size", "8"])
    with running_server(repo) as server:
        yield server


def test_every_model_classifies_and_explains(range_server):
    image = np.random.default_rng(0).integers(0, 256, (28, 28), np.uint8)
    with ClassifierClient(range_server.address) as client:
        assert sorted(client.list_models()) == sorted(MODELS)
        for name in MODELS:
            preds = client.classify([image, image], model=name, top_k=3)
            assert len(preds) == 2 and len(preds[0]) == 3, name
            assert abs(sum(p.score for p in client.classify([image], model=name, top_k=10)[0]) - 1) < 1e-4, name
            info = client.get_model(name)
            if name in NO_CAM:
                assert not info.supports_cam and NO_CAM[name] in info.cam_unsupported_reason, name
                with pytest.raises(grpc.RpcError) as err:
                    client.explain([image], model=name)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
                assert NO_CAM[name] in err.value.details(), name
                continue
            assert info.supports_cam, name
            e = client.explain([image], model=name, overlay=True)[0]
            assert e.heatmap.shape == (28, 28) and 0 <= e.heatmap.min() and e.heatmap.max() <= 1, name
            assert e.target.index == preds[0][0].index and e.overlay_png.startswith(b"\x89PNG"), name
