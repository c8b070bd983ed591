"""The KServe v2 REST routes (with Triton's model configuration, statistics and repository extensions), each
a translation of the REST call into the gRPC message of the same KServe method, answered by the KServe
servicer itself, and of its answer back into JSON (codec.py). Nothing here decodes a tensor or checks a
model's input: the servicer does, as for gRPC.
"""

from __future__ import annotations

from aiohttp import web

from ...engine.errors import InvalidInput
from ...wire.inference import grpc_service_pb2 as pb
from ..api.kserve.service import KServeService
from . import codec
from .gate import JSON, Call, HttpGate

BINARY_EXTENSION = "binary_tensor_data"
# JSON beyond this many bytes is refused (send tensors as binary data): parsed JSON numbers take about ten
# times their text's size in memory, so the body limit alone would let one call hold over half a gigabyte.
MAX_JSON_BYTES = 16 * 1024 * 1024


def _json(value, status: int = 200) -> web.Response:
    return web.Response(status=status, body=codec.dumps(value), content_type=JSON)


def _parsed(text: bytes | bytearray | memoryview) -> dict:
    """A body's JSON (an infer body's JSON part), refused past MAX_JSON_BYTES before it is parsed."""
    if len(text) > MAX_JSON_BYTES:
        raise InvalidInput(f"{len(text)} bytes of JSON are over {MAX_JSON_BYTES}; send tensors as binary data "
                           "(Triton's binary tensor extension)")
    return codec.parse_json(text)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


class KServeRoutes:
    def __init__(self, service: KServeService):
        self.service = service

    async def _run(self, method: str, message, call: Call):
        return await getattr(self.service, method)(message, call.context)

    async def _json_body(self, call: Call, optional: bool = False) -> dict:
        body = await call.body()
        if not body and optional:
            return {}
        return _parsed(body)

    # -- health and metadata -------------------------------------------------------------------------------
    async def live(self, request: web.Request, call: Call) -> web.Response:
        live = (await self._run("ServerLive", pb.ServerLiveRequest(), call)).live
        return _json({"live": live}, 200 if live else 400)

    async def ready(self, request: web.Request, call: Call) -> web.Response:
        ready = (await self._run("ServerReady", pb.ServerReadyRequest(), call)).ready
        return _json({"ready": ready}, 200 if ready else 400)

    async def model_ready(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model(request)
        ready = (await self._run("ModelReady", pb.ModelReadyRequest(name=name, version=version), call)).ready
        return _json({"name": name, "ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: web.Request, call: Call) -> web.Response:
        answer = await self._run("ServerMetadata", pb.ServerMetadataRequest(), call)
        return _json({"name": answer.name, "version": answer.version,
                      "extensions": [*answer.extensions, BINARY_EXTENSION]})

    async def model_metadata(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model(request)
        answer = await self._run("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version), call)
        return _json(codec.message_json(answer))

    async def model_config(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model(request)
        answer = await self._run("ModelConfig", pb.ModelConfigRequest(name=name, version=version), call)
        return _json(codec.message_json(answer.config))

    async def model_statistics(self, request: web.Request, call: Call) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        answer = await self._run("ModelStatistics", pb.ModelStatisticsRequest(name=name, version=version), call)
        return _json(codec.message_json(answer))

    # -- inference -----------------------------------------------------------------------------------------
    async def infer(self, request: web.Request, call: Call) -> web.Response:
        name, version = _model(request)
        body = await call.body()
        text, binary = codec.split_body(body, request.headers.get(codec.HEADER_LENGTH))
        infer = codec.infer_request(_parsed(text), binary, name, version)
        del body, text, binary  # the request message holds the tensors now
        answer = await self._run("ModelInfer", infer.request, call)
        out, header_length = codec.infer_response(answer, infer)
        if header_length is None:
            return web.Response(body=out, content_type=JSON)
        return web.Response(body=out, content_type="application/octet-stream",
                            headers={codec.HEADER_LENGTH: str(header_length)})

    # -- repository (Triton's extension) -------------------------------------------------------------------
    async def repository_index(self, request: web.Request, call: Call) -> web.Response:
        body = await self._json_body(call, optional=True)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("`ready` must be true or false")
        answer = await self._run("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), call)
        return _json([codec.message_json(m) for m in answer.models])

    async def repository_load(self, request: web.Request, call: Call) -> web.Response:
        body = await self._json_body(call, optional=True)
        message = pb.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        codec.set_parameters(message.parameters, body.get("parameters"), "load")
        await self._run("RepositoryModelLoad", message, call)
        return _json({})

    async def repository_unload(self, request: web.Request, call: Call) -> web.Response:
        await self._json_body(call, optional=True)
        await self._run("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=request.match_info["model"]),
                        call)
        return _json({})


def add_routes(router: web.UrlDispatcher, routes: KServeRoutes, gate: HttpGate) -> None:
    """Every route, wrapped by the gate with the KServe method whose role and name it takes."""
    r = routes
    get, post = router.add_get, router.add_post
    get("/v2/health/live", gate.wrap("ServerLive", r.live, admitted=False), allow_head=True)
    get("/v2/health/ready", gate.wrap("ServerReady", r.ready, admitted=False), allow_head=True)
    get("/v2", gate.wrap("ServerMetadata", r.server_metadata))
    get("/v2/models/stats", gate.wrap("ModelStatistics", r.model_statistics))
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        get(base, gate.wrap("ModelMetadata", r.model_metadata))
        get(base + "/ready", gate.wrap("ModelReady", r.model_ready), allow_head=True)
        get(base + "/config", gate.wrap("ModelConfig", r.model_config))
        get(base + "/stats", gate.wrap("ModelStatistics", r.model_statistics))
        post(base + "/infer", gate.wrap("ModelInfer", r.infer))
    post("/v2/repository/index", gate.wrap("RepositoryIndex", r.repository_index))
    post("/v2/repository/models/{model}/load", gate.wrap("RepositoryModelLoad", r.repository_load))
    post("/v2/repository/models/{model}/unload", gate.wrap("RepositoryModelUnload", r.repository_unload))

