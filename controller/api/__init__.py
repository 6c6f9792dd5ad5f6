"""The REST API (FastAPI): ``create_app(settings)``."""

from controller.api.app import create_app

__all__ = ["create_app"]
