"""The ``jds.v1`` gRPC protocol: ``generation.proto`` and the code generated from it.

Regenerate after editing the proto (a test checks the committed code is in sync):

    python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. jds/api/generation.proto
"""
