"""The ``jds.v1`` gRPC protocol and the code generated from it: ``generation.proto`` (what clients
speak) and ``instances.proto`` (what a router speaks to prefill and decode processes).

Regenerate after editing a proto (a test checks the committed code is in sync):

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. jds/api/generation.proto jds/api/instances.proto
"""
