"""Use-cases shared by REST and gRPC: validate, stamp, write intents, read state."""
