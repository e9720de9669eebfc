"""Public APIs: REST (FastAPI) today, gRPC next."""
