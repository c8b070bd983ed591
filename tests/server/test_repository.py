"""Model management without restarts: broken versions, version policies, memory over load/unload cycles,
message size limits."""

import asyncio
import logging
import shutil

import grpc
import numpy as np
import pytest

from serving.client import ClassifierClient
from serving.engine.inference import MODEL_INPUT_BATCH, ImageBatch, InferenceRequest
from serving.server.repository import READY, UNAVAILABLE, ModelRepository
from tests.conftest import export_small, running_server


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_broken_new_version_is_reported_and_old_one_keeps_serving(tmp_path):
    export_small(tmp_path)
    with running_server(tmp_path) as server, ClassifierClient(server.address) as client:
        image = np.zeros((28, 28), np.uint8)
        (tmp_path / "fmnist" / "2").mkdir()
        (tmp_path / "fmnist" / "2" / "model.onnx").write_bytes(b"this is not an onnx file")
        server.call(server.server.repository.poll_once())
        states = {(s.version, s.state) for s in server.server.repository.statuses("fmnist")}
        assert (2, UNAVAILABLE) in states and (1, READY) in states
        info = client.get_model("fmnist")
        broken = [v for v in info.versions if v[0] == 2][0]
        assert broken[1] == UNAVAILABLE and "Protobuf parsing failed" in broken[2], broken
        assert client.classify([image])[0]  # version 1 still answers
        # A version whose graph disagrees with config.pbtxt is refused the same way.
        shutil.rmtree(tmp_path / "fmnist" / "2")
        other = tmp_path / "other"
        from training.export import export_to_repository
        from training.models import create_model
        export_to_repository(create_model("small_fmnist", in_channels=3, input_size=(32, 32)),
                             [str(i) for i in range(10)], other, "fmnist", "small_fmnist", version=3)
        shutil.copytree(other / "fmnist" / "3", tmp_path / "fmnist" / "3")
        server.call(server.server.repository.poll_once())
        status = {s.version: s for s in server.server.repository.statuses("fmnist")}
        assert status[3].state == UNAVAILABLE and "does not match the config" in status[3].reason
        assert client.list_models() == {"fmnist": [1]}


def test_version_policy_all_and_specific(tmp_path):
    export_small(tmp_path)
    export_small(tmp_path, seed=1)
    config = tmp_path / "fmnist" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace("latest {\n    num_versions: 1\n  }", "all {\n  }"))

    async def ready_versions():
        repo = ModelRepository(tmp_path)
        await repo.load_all()
        versions = repo.ready_versions("fmnist")
        await repo.close()
        return versions

    assert asyncio.run(ready_versions()) == [2, 1]
    config.write_text(text.replace("latest {\n    num_versions: 1\n  }", "specific {\n    versions: 1\n  }"))
    assert asyncio.run(ready_versions()) == [1]


def test_memory_is_released_over_load_unload_cycles(tmp_path):
    export_small(tmp_path)

    async def cycles(n):
        repo = ModelRepository(tmp_path)
        sizes = []
        for _ in range(n):
            await repo.load("fmnist")
            zeros = ImageBatch((4, 1, 28, 28), "float32", np.zeros((4, 1, 28, 28), np.float32), MODEL_INPUT_BATCH)
            result = await repo.get("fmnist").infer(InferenceRequest(zeros))
            assert result.logits.shape == (4, 10)
            await repo.unload("fmnist")
            sizes.append(rss_mb())
        return sizes

    sizes = asyncio.run(cycles(50))
    # glibc grows RSS in steps of several MB as allocator arenas warm up and then plateaus; a leaked
    # version (sessions, arena, weights: about 20 MB each here, 650 MB over these 30 cycles when the
    # sessions are kept alive on purpose) would add that much on every cycle instead.
    held = sizes[-1] - sizes[19]
    print(f"RSS over 50 load/unload cycles: {sizes[0]:.1f} -> {sizes[-1]:.1f} MB "
          f"(cycles 20-50: {held:+.1f} MB): {[round(s) for s in sizes]}")
    assert held < 40, sizes


def test_message_size_limit_is_a_clear_error(tmp_path):
    export_small(tmp_path)
    with running_server(tmp_path, max_message_bytes=1 << 20) as server:
        with ClassifierClient(server.address) as client, pytest.raises(grpc.RpcError) as err:
            client.classify([np.zeros((28, 28), np.uint8)] * 2000)  # about 1.6 MB
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()


def _copy_model(repo, source: str, name: str):
    """The exported model `source` again as `name` (config name and directory name must agree)."""
    shutil.copytree(repo / source, repo / name)
    config = repo / name / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{source}"', f'name: "{name}"', 1))
    return repo / name


def test_a_model_reads_no_file_outside_its_directory(tmp_path, caplog):
    """label_filename, labels.txt, config.pbtxt and a version's model file may not lead out of the model's
    directory, by `..`, an absolute path or a symlink: the model (or version) stays unavailable with the field
    named, and the outside file is never read (here it would load: ten lines, one per class)."""
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    export_small(repo, "fmnist")
    export_small(outside, "stranger", seed=1)  # a valid model and config elsewhere on the machine
    secret = outside / "secret.txt"
    secret.write_text("".join(f"SECRET_{i}\n" for i in range(10)))
    shutil.copy(repo / "fmnist" / "config.pbtxt", outside / "config.pbtxt")

    def label_filename(model_dir, value: str) -> None:
        config = model_dir / "config.pbtxt"
        config.write_text(config.read_text().replace('label_filename: "labels.txt"', f'label_filename: "{value}"'))

    label_filename(_copy_model(repo, "fmnist", "dotdot"), "../../outside/secret.txt")
    label_filename(_copy_model(repo, "fmnist", "absolute"), str(secret))
    (_copy_model(repo, "fmnist", "linked_labels") / "labels.txt").unlink()
    (repo / "linked_labels" / "labels.txt").symlink_to(secret)
    linked_config = _copy_model(repo, "fmnist", "linked_config") / "config.pbtxt"
    linked_config.unlink()
    linked_config.symlink_to(outside / "config.pbtxt")
    (_copy_model(repo, "fmnist", "linked_weights") / "1" / "model.onnx").unlink()
    (repo / "linked_weights" / "1" / "model.onnx").symlink_to(outside / "stranger" / "1" / "model.onnx")
    # A symlink that stays inside the model's directory is followed as before.
    inside = _copy_model(repo, "fmnist", "linked_inside")
    (inside / "names").mkdir()
    (inside / "labels.txt").rename(inside / "names" / "classes.txt")
    (inside / "labels.txt").symlink_to("names/classes.txt")

    refused = {"dotdot": "output 'logits' label_filename '../../outside/secret.txt' leads outside the model directory",
               "absolute": f"output 'logits' label_filename '{secret}' leads outside the model directory",
               "linked_labels": "output 'logits' label_filename 'labels.txt' leads outside the model directory",
               "linked_config": "config.pbtxt 'config.pbtxt' leads outside the model directory",
               "linked_weights": "1/model.onnx '1/model.onnx' leads outside the model directory"}
    with running_server(repo) as server, ClassifierClient(server.address) as client:
        for name, reason in refused.items():
            with pytest.raises(grpc.RpcError) as err:
                client.classify([np.zeros((28, 28), np.uint8)], model=name)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
            assert reason in err.value.details(), (name, err.value.details())
        assert client.list_models()["linked_weights"] == [] and client.list_models()["dotdot"] == []
        assert client.get_model("linked_inside").labels == client.get_model("fmnist").labels  # not refused
        seen = [client.get_model(n).labels for n in ("fmnist", "linked_inside")]
        seen += [s.reason for s in server.server.repository.statuses()]
        seen += [server.server.repository.model_error(n) for n in refused]
    assert "SECRET" not in repr(seen) + caplog.text  # the outside file's lines reached no answer and no log


def test_a_model_with_tritons_model_warmup_loads_and_is_ready(tmp_path, caplog):
    """Triton's `model_warmup` parses; our own warm-up replaces it, and the log says so by name."""
    export_small(tmp_path)
    config = tmp_path / "fmnist" / "config.pbtxt"
    config.write_text(config.read_text() + """model_warmup [
  {
    name: "w"
    batch_size: 1
    inputs { key: "input" value: { data_type: TYPE_FP32 dims: [ 1, 28, 28 ] zero_data: true } }
  }
]
""")
    with caplog.at_level(logging.WARNING), running_server(tmp_path) as server, \
            ClassifierClient(server.address) as client:
        assert [(s.version, s.state) for s in server.server.repository.statuses("fmnist")] == [(1, READY)]
        assert client.list_models() == {"fmnist": [1]}
        assert client.classify([np.zeros((28, 28), np.uint8)])[0]
    assert "model fmnist version 1: config.pbtxt model_warmup 'w' (batch_size 1): replaced by this server's " \
           "warm-up" in caplog.text
