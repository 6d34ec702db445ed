"""The HTTP server: OpenAI- and Ollama-compatible APIs over one model pool.

    >>> from hearth.server import create_app
    >>> app = create_app(models=["smollm2"])       # serve with uvicorn
"""

from .app import create_app
from .pool import ModelPool

__all__ = ["create_app", "ModelPool"]
