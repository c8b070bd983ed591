"""The REST port (KServe v2 / Open Inference Protocol with Triton's extensions) and the page at `/`: site.py
(aiohttp on the server's loop), gate.py (what runs around each call), routes.py (REST -> the KServe
servicer), codec.py (REST bodies <-> KServe's gRPC messages), openapi.py, static/ (the page)."""
