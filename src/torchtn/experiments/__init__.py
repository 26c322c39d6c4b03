"""Experiments: complete jobs (the CLI's commands) built from the library."""
from .compress import CompressConfig, run_compress

__all__ = ["CompressConfig", "run_compress"]
