"""One loaded model version without a server: the batch body the batcher calls."""

import numpy as np
import pytest

from serving.engine.errors import InvalidInput
from serving.engine.inference import InferenceRequest, RawTensor
from serving.repository_format import load_spec
from serving.server.model import load_version


@pytest.fixture(scope="module")
def version(small_repo):
    return load_version(load_spec(small_repo / "fmnist"), 1)


def pixels(seed: int) -> RawTensor:
    data = np.random.default_rng(seed).integers(0, 256, (28, 28), np.uint8)
    return RawTensor((28, 28), "uint8", data.tobytes())


def test_one_bad_request_fails_alone_and_the_others_match_separate_runs(version):
    good = [InferenceRequest([pixels(1), pixels(2)]), InferenceRequest([pixels(3)])]
    bad = InferenceRequest([RawTensor((28, 28), "uint8", b"\x00" * 10)])
    results = version.execution.execute([good[0], bad, good[1]])
    assert isinstance(results[1], InvalidInput) and "needs 784" in str(results[1])
    for req, got in zip(good, (results[0], results[2])):
        alone = version.execution.execute([req])[0]
        np.testing.assert_allclose(got.logits, alone.logits, atol=1e-5)
        assert got.ranking.tolist() == alone.ranking.tolist()
        np.testing.assert_allclose(got.ranked_probabilities, np.take_along_axis(got.probabilities, got.ranking, 1))


def test_whole_batch_decoded_at_once_equals_one_by_one(version):
    """The vectorised path (every image uint8 at the model size) gives the same input as per-image decoding."""
    reqs = [InferenceRequest([pixels(i)], keep_inputs=True) for i in range(5)]
    batched = version.execution.execute(reqs)
    for i, r in enumerate(batched):
        expected = np.frombuffer(pixels(i).data, np.uint8).reshape(1, 1, 28, 28) / np.float32(255)
        np.testing.assert_allclose(r.inputs, expected, atol=1e-7)


def test_default_queue_timeout_of_the_config_applies_to_requests_without_one(small_repo):
    import asyncio

    from serving.engine.errors import DeadlineExceeded

    mv = load_version(load_spec(small_repo / "fmnist"), 1)
    mv.spec.batching.default_timeout_us = 1  # expires before any batch can take it

    async def main():
        await mv.batcher.start()
        try:
            with pytest.raises(DeadlineExceeded):
                await mv.infer(InferenceRequest([pixels(0)]))
            return await mv.infer(InferenceRequest([pixels(0)]), timeout_s=10)  # its own timeout wins
        finally:
            await mv.batcher.stop()

    assert asyncio.run(main()).logits.shape == (1, 10)


def test_config_pbtxt_batching_fields_then_command_line_overrides(tmp_path):
    from serving.repository_format import read_config, write_config
    from tests.conftest import export_small

    export_small(tmp_path)
    model_dir = tmp_path / "fmnist"
    config = read_config(model_dir)
    config.max_batch_size = 32
    db = config.dynamic_batching
    db.max_queue_delay_microseconds = 700
    del db.preferred_batch_size[:]
    db.preferred_batch_size.extend([16, 8])
    db.priority_levels = 3
    db.default_queue_policy.max_queue_size = 50
    db.default_queue_policy.default_timeout_microseconds = 2_000_000
    del config.instance_group[:]
    config.instance_group.add(count=2)
    write_config(model_dir, config)

    b = load_spec(model_dir).batching
    assert (b.max_batch_size, b.max_queue_delay_us, b.preferred_batch_sizes) == (32, 700, [8, 16])
    assert (b.priority_levels, b.default_priority, b.max_queue_size, b.default_timeout_us) == (3, 2, 50, 2_000_000)
    assert b.instances == 2 and b.combine_requests
    assert load_spec(model_dir, overrides={"max_batch_size": 4, "instances": 1}).batching.max_batch_size == 4

    config.ClearField("dynamic_batching")  # Triton then runs requests one at a time, never two together
    write_config(model_dir, config)
    b = load_spec(model_dir).batching
    assert b.max_queue_delay_us == 0 and not b.combine_requests
