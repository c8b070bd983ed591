"""One served model version without a server: its batcher's policy from the config and the command line."""

import numpy as np
import pytest

from serving.engine.inference import InferenceRequest, RawTensor
from serving.repository_format import load_spec
from serving.server.model import load_version


def pixels(seed: int) -> RawTensor:
    data = np.random.default_rng(seed).integers(0, 256, (28, 28), np.uint8)
    return RawTensor((28, 28), "uint8", data.tobytes())


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
