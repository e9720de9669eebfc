"""Logging (and, later, metrics and tracing)."""

from corral.telemetry.logging import REQUEST_ID, setup_logging

__all__ = ["REQUEST_ID", "setup_logging"]
