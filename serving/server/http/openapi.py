"""The OpenAPI 3.0 document of the REST API, served at `/v2/openapi.json` (tests check it against the routes
and run schemathesis from it against a live server)."""

from __future__ import annotations

from importlib import metadata

_ERROR = {"description": "the error, with the HTTP status of its gRPC code",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_PARAMETERS = {"type": "object", "additionalProperties": {"oneOf": [{"type": "boolean"}, {"type": "integer"},
                                                                    {"type": "number"}, {"type": "string"}]}}
_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
              "FP64", "BYTES"]


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _op(summary: str, ok: dict, *, open_call: bool = False, body: dict | None = None, tag: str = "kserve",
        extra: dict | None = None) -> dict:
    op = {"summary": summary, "tags": [tag], "responses": {"200": ok, "default": _ERROR, **(extra or {})}}
    if open_call:
        op["security"] = []
    if body is not None:
        op["requestBody"] = body
    return op


def _path_params(*names: str) -> list[dict]:
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}} for n in names]


def _model_paths(prefix: str, params: list[dict]) -> dict:
    infer_body = {"required": True, "content": {
        "application/json": {"schema": _ref("InferRequest")},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "the JSON request (its length in the Inference-Header-Content-"
                                                    "Length header), then the binary data of the inputs that have "
                                                    "binary_data_size"}}}
    infer_ok = {"description": "the outputs; with binary outputs, the JSON (its length in the "
                               "Inference-Header-Content-Length response header) then their bytes",
                "content": {"application/json": {"schema": _ref("InferResponse")},
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
    not_ready = {"400": _json({"oneOf": [_ref("ModelReady"), _ref("Error")]}, "not ready, or a malformed version")}
    return {
        prefix: {"parameters": params, "get": _op("model metadata", _json(_ref("ModelMetadata")))},
        prefix + "/ready": {"parameters": params,
                            "get": _op("model readiness", _json(_ref("ModelReady")), open_call=True, extra=not_ready)},
        prefix + "/config": {"parameters": params,
                             "get": _op("the served model configuration (Triton's config.pbtxt schema as JSON)",
                                        _json({"type": "object"}), tag="triton")},
        prefix + "/stats": {"parameters": params,
                            "get": _op("model statistics", _json(_ref("Statistics")), tag="triton")},
        prefix + "/infer": {"parameters": [*params, {
            "name": "Inference-Header-Content-Length", "in": "header", "required": False,
            "schema": {"type": "integer", "minimum": 0}}],
            "post": _op("inference (JSON or binary tensors)", infer_ok, body=infer_body)},
    }


def document() -> dict:
    try:
        version = metadata.version("cnn-serving")
    except metadata.PackageNotFoundError:
        version = "0.1.0"
    tensor = {"type": "object", "required": ["name", "shape", "datatype"], "properties": {
        "name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": _DATATYPES}, "parameters": _PARAMETERS,
        "data": {"type": "array", "description": "row-major values, flat or nested"}}}
    model = _path_params("model")
    versioned = _path_params("model", "version")
    paths = {
        "/v2": {"get": _op("server metadata", _json(_ref("ServerMetadata")))},
        "/v2/health/live": {"get": _op("liveness", _json({"type": "object"}), open_call=True)},
        "/v2/health/ready": {"get": _op("readiness", _json({"type": "object"}), open_call=True,
                                        extra={"400": _json({"type": "object"}, "not ready")})},
        "/v2/models/stats": {"get": _op("statistics of every ready model version", _json(_ref("Statistics")),
                                        tag="triton")},
        **_model_paths("/v2/models/{model}", model),
        **_model_paths("/v2/models/{model}/versions/{version}", versioned),
        "/v2/repository/index": {"post": _op(
            "the repository's models and versions with their state",
            _json({"type": "array", "items": _ref("RepositoryModel")}), tag="triton",
            body={"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"ready": {"type": "boolean"}}}}}})},
        "/v2/repository/models/{model}/load": {"parameters": model, "post": _op(
            "load a model (admin token)", _json({"type": "object"}), tag="triton",
            body={"required": False, "content": {"application/json": {"schema": {"type": "object"}}}})},
        "/v2/repository/models/{model}/unload": {"parameters": model, "post": _op(
            "unload a model (admin token)", _json({"type": "object"}), tag="triton",
            body={"required": False, "content": {"application/json": {"schema": {"type": "object"}}}})},
    }
    schemas = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}}}},
        "TensorMetadata": {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
            "name": {"type": "string"}, "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}}}},
        "ModelMetadata": {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
                          "properties": {"name": {"type": "string"},
                                         "versions": {"type": "array", "items": {"type": "string"}},
                                         "platform": {"type": "string"},
                                         "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                                         "outputs": {"type": "array", "items": _ref("TensorMetadata")}}},
        "ModelReady": {"type": "object", "required": ["name", "ready"], "properties": {
            "name": {"type": "string"}, "ready": {"type": "boolean"}}},
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": _PARAMETERS,
            "inputs": {"type": "array", "minItems": 1, "items": tensor},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "parameters": _PARAMETERS}}}}},
        "InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": _PARAMETERS,
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"],
                                                   "properties": {**tensor["properties"]}}}}},
        "Statistics": {"type": "object", "properties": {"model_stats": {"type": "array", "items": {"type": "object"}}}},
        "RepositoryModel": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"},
            "reason": {"type": "string"}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "cnn-serving REST API (KServe v2 / Open Inference Protocol)", "version": version,
                 "description": "KServe v2 REST with Triton's binary tensor data, classification, model "
                                "configuration, statistics and model repository extensions. Errors are "
                                "{\"error\": \"...\"} with the HTTP status of the gRPC code the same call gets."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}, "schemas": schemas},
        "paths": paths,
    }
