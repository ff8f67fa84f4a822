"""gRPC transport: server assembly, request handlers, proto <-> domain conversion, status mapping."""
