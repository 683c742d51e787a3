"""diffmesh: a gRPC inference mesh for diffusion image generation."""
__version__ = "0.1.0"
