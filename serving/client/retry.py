"""The one retry policy of the clients and batch jobs, carried out by gRPC itself (its retry service config).

Only UNAVAILABLE is retried: the server refused the call before running it (it is draining or restarting), or
the connection failed or closed under the call. Both are safe to send again, and the calls retried here are
the classifier's, which change nothing on the server. gRPC waits a random time between 0 and the current
backoff before each retry (full jitter, so that the callers a replica refused do not come back together),
reconnecting as needed; a call whose retries all fail on one target then goes to the next target, if any.
Streams are retried by gRPC only until their first answer; a batch job reopens a stream cut after that
itself, waiting `RetryPolicy.delay` as gRPC would.

tritonclient users get the same behaviour by passing `service_config_option(...)` (or its JSON, shown in the
docs/reliability.md) among the `channel_args` of `tritonclient.grpc.InferenceServerClient`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

CLASSIFIER_SERVICE = "classifier.v1.Classifier"
# The KServe calls that read or infer: the model management calls (load, unload) are left out.
KSERVE_SERVICE = "inference.GRPCInferenceService"
KSERVE_READ_METHODS = ("ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady", "ServerReady", "ServerLive",
                       "ServerMetadata", "ModelStatistics", "RepositoryIndex")
GRPC_MAX_ATTEMPTS = 5  # gRPC clamps maxAttempts to 5


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` after the first try (gRPC allows at most 4), waiting up to `initial_backoff_s` before the
    first, growing by `multiplier` up to `max_backoff_s`. A target that could not be reached is tried again
    within `reconnect_backoff_s` (gRPC's default grows to 120 s: a replica back from a restart would be left
    unused while the next one restarts, and a client of both would find neither)."""
    retries: int = 3
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    reconnect_backoff_s: float = 1.0

    @property
    def max_attempts(self) -> int:
        return min(self.retries + 1, GRPC_MAX_ATTEMPTS)

    def method_config(self, names: list[dict]) -> dict:
        return {"name": names, "retryPolicy": {
            "maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff_s:g}s",
            "maxBackoff": f"{self.max_backoff_s:g}s", "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"]}}

    def service_config(self) -> str:
        """The channel's service config (JSON): the classifier's calls and KServe's reading calls retried."""
        if self.retries <= 0:
            return json.dumps({})
        names = [{"service": CLASSIFIER_SERVICE}] + [{"service": KSERVE_SERVICE, "method": m}
                                                     for m in KSERVE_READ_METHODS]
        return json.dumps({"methodConfig": [self.method_config(names)]})

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (1, 2, ...), drawn as gRPC draws its own: uniformly between 0
        and the backoff, which starts at `initial_backoff_s` and grows by `multiplier` up to `max_backoff_s`."""
        ceiling = min(self.initial_backoff_s * self.multiplier ** (max(retry, 1) - 1), self.max_backoff_s)
        return random.uniform(0, ceiling)


DEFAULT_POLICY = RetryPolicy()


def service_config_option(policy: RetryPolicy = DEFAULT_POLICY) -> tuple[str, str]:
    """The channel option that turns the policy on: add it to a channel's (or tritonclient's) options."""
    return ("grpc.service_config", policy.service_config())


def channel_options(policy: RetryPolicy = DEFAULT_POLICY) -> list[tuple[str, int | str]]:
    """The policy's channel options: its service config, and reconnection at most `reconnect_backoff_s` apart."""
    reconnect_ms = int(policy.reconnect_backoff_s * 1000)
    return [service_config_option(policy), ("grpc.initial_reconnect_backoff_ms", min(100, reconnect_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_ms)]
