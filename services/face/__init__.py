"""The face stage: face analysis (services.face.analysis) and identity encoding over gRPC."""
