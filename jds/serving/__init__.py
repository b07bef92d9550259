"""What the gRPC server is made of: request translation and validation, metrics."""
