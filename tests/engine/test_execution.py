"""One loaded model version without a server: loading, one batch's execution, CAM."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from serving import cam_maths
from serving.engine import cam
from serving.engine.errors import InvalidInput, ModelNotFound
from serving.engine.execution import probabilities
from serving.engine.inference import MODEL_INPUT_BATCH, ImageBatch, InferenceRequest, RawTensor
from serving.engine.loading import choose_version, load_execution, model_names, only_model
from serving.engine.runtime import RuntimeOptions
from serving.repository_format import ConfigError, load_spec
from tests.conftest import export_small
from training.export import export_to_repository
from training.models import create_model


@pytest.fixture(scope="module")
def loaded(small_repo):
    return load_execution(load_spec(small_repo / "fmnist"), 1, RuntimeOptions(device="cpu"), instances=1)


def pixels(seed: int) -> RawTensor:
    data = np.random.default_rng(seed).integers(0, 256, (28, 28), np.uint8)
    return RawTensor((28, 28), "uint8", data.tobytes())


def test_one_bad_request_fails_alone_and_the_others_match_separate_runs(loaded):
    good = [InferenceRequest([pixels(1), pixels(2)]), InferenceRequest([pixels(3)])]
    bad = InferenceRequest([RawTensor((28, 28), "uint8", b"\x00" * 10)])
    results = loaded.execution.execute([good[0], bad, good[1]])
    assert isinstance(results[1], InvalidInput) and "needs 784" in str(results[1])
    for req, got in zip(good, (results[0], results[2])):
        alone = loaded.execution.execute([req])[0]
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-5)
        assert got.ranking.tolist() == alone.ranking.tolist()
        np.testing.assert_allclose(got.ranked_probabilities, np.take_along_axis(got.probabilities, got.ranking, 1))


def test_the_phases_of_a_batch_are_reported(loaded):
    results = loaded.execution.execute([InferenceRequest([pixels(0)])])
    assert len(results.phases) == 3 and all(p >= 0 for p in results.phases) and results.phases[1] > 0


def test_kserve_pixels_and_classifier_pixels_give_the_same_answer(loaded):
    """The two APIs' layouts of one picture (NCHW in a KServe tensor, HW in a classifier.v1 tensor) are one
    input to the model."""
    picture = np.frombuffer(pixels(7).data, np.uint8)
    kserve = InferenceRequest(ImageBatch((1, 1, 28, 28), "uint8", picture.tobytes(), MODEL_INPUT_BATCH))
    a, b = loaded.execution.execute([kserve, InferenceRequest([pixels(7)])])
    np.testing.assert_array_equal(a.logits, b.logits)


def test_cam_is_the_class_weights_over_the_feature_maps(loaded):
    """The CAM of each image is W[class] . features, upsampled and scaled to [0, 1], for the predicted class
    unless one is asked."""
    requests = [InferenceRequest([pixels(i)], cam=True, features=True) for i in range(3)]
    requests.append(InferenceRequest([pixels(3)], cam=True, target_class=4, features=True))
    results = loaded.execution.execute(requests)
    weights = loaded.execution.cam_weights
    for i, r in enumerate(results):
        target = 4 if i == 3 else int(r.ranking[0, 0])
        assert r.target_classes.tolist() == [target]
        raw = np.einsum("c,chw->hw", weights[target].reshape(-1), r.features[0])
        expected = cam_maths.upsample(raw[None], (28, 28))[0]
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        np.testing.assert_allclose(r.cams[0], expected, atol=1e-5)
        assert r.cams.min() == 0 and abs(r.cams.max() - 1) < 1e-6



def test_maps_computed_for_a_whole_batch_match_each_request_alone(loaded):
    """The batch's maps are computed in one call; a request between them that wants none, one that fails and
    one with a target class and two images each get what they would get alone."""
    bad = InferenceRequest([RawTensor((28, 28), "uint8", b"\x00" * 10)], cam=True)
    requests = [InferenceRequest([pixels(1)], cam=True), InferenceRequest([pixels(2)]), bad,
                InferenceRequest([pixels(3), pixels(4)], cam=True, target_class=7)]
    results = loaded.execution.execute(requests)
    assert isinstance(results[2], InvalidInput)
    assert results[1].cams is None and results[1].target_classes is None
    assert results[3].target_classes.tolist() == [7, 7]
    for req, got in ((requests[0], results[0]), (requests[3], results[3])):
        alone = loaded.execution.execute([req])[0]
        assert got.target_classes.tolist() == alone.target_classes.tolist()
        np.testing.assert_allclose(got.cams, alone.cams, atol=1e-5)

def test_overlays_are_pngs_of_the_input_size(loaded):
    (r,) = loaded.execution.execute([InferenceRequest([pixels(1), pixels(2)], cam=True, keep_inputs=True)])
    pngs = cam.overlays(r.inputs, r.cams)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)


def test_probabilities_are_a_softmax_and_a_binary_logit_gives_two():
    p = probabilities(np.array([[1.0, 2.0, 3.0]], np.float32))
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    binary = probabilities(np.array([[0.0], [2.0]], np.float32))
    np.testing.assert_allclose(binary, [[0.5, 0.5], [1 - 1 / (1 + np.exp(-2)), 1 / (1 + np.exp(-2))]], rtol=1e-6)


def test_the_only_model_and_the_version_a_caller_means(tmp_path):
    export_small(tmp_path, "first")
    export_small(tmp_path, "first", version=3)
    assert only_model(model_names(tmp_path), "here") == "first"
    spec = load_spec(tmp_path / "first")
    assert choose_version(spec) == 3 and choose_version(spec, 1) == 1
    with pytest.raises(ModelNotFound, match="no version 2"):
        choose_version(spec, 2)
    export_small(tmp_path, "second")
    with pytest.raises(ModelNotFound, match="holds first, second; name one"):
        only_model(model_names(tmp_path), "here")


def test_a_model_file_that_disagrees_with_its_config_is_refused(tmp_path):
    """A wrong file in a version directory (here another model's, with 3 classes) is refused at load."""
    export_small(tmp_path)
    other = tmp_path / "other"
    torch.manual_seed(0)
    model = create_model("small_fmnist", in_channels=1, num_classes=3, input_size=(28, 28))
    export_to_repository(model, ["a", "b", "c"], other, "three", "small_fmnist", {})
    shutil.copy(other / "three" / "1" / "model.onnx", tmp_path / "fmnist" / "1" / "model.onnx")
    with pytest.raises(ConfigError, match="model gives 3 logits but labels.txt lists 10 classes"):
        load_execution(load_spec(tmp_path / "fmnist"), 1, RuntimeOptions(device="cpu"), instances=1)
