"""Overload through the real server: 1,000 concurrent requests against a queue of 64. Every request ends
in an answer, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED; none is lost or fails otherwise."""

import asyncio
import collections

import grpc
import numpy as np

from serving.client import to_wire_image
from serving.wire.classifier.v1 import classifier_pb2 as pb
from serving.wire.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import running_server


def test_thousand_requests_against_a_queue_of_64(small_repo):
    image = to_wire_image(np.zeros((28, 28), np.uint8))
    request = pb.ClassifyRequest(model="fmnist", images=[image] * 8)

    async def flood(address: str) -> collections.Counter:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ClassifierStub(channel)

            async def one() -> str:
                try:
                    response = await stub.Classify(request, timeout=2.0)
                    assert len(response.results) == 8
                    return "OK"
                except grpc.aio.AioRpcError as e:
                    return e.code().name

            return collections.Counter(await asyncio.gather(*(one() for _ in range(1000))))

    with running_server(small_repo, batching_overrides={"max_queue_size": 64, "max_batch_size": 8}) as server:
        outcome = asyncio.run(flood(server.address))
        stats = server.server.repository.get("fmnist").stats
    assert sum(outcome.values()) == 1000
    assert set(outcome) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, outcome
    assert outcome["OK"] > 0 and outcome["RESOURCE_EXHAUSTED"] > 0, outcome
    assert stats.rejected == outcome["RESOURCE_EXHAUSTED"]
    print(f"1,000 requests against a queue of 64: {dict(outcome)}")
