"""REST API v1 (FastAPI): the only package that imports fastapi."""

from corral.api.rest.app import ApiServices, create_app

__all__ = ["ApiServices", "create_app"]
