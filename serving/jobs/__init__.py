"""Batch inference over whole data sets: inputs (`sources`), resumable output rows (`output`), the shared
summary and pictures (`report`) and the engine that classifies (`grpc_engine`: streams to servers).

The gRPC engine is client code: it runs from the base install and imports nothing of the server.
"""
