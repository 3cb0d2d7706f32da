"""Network code: one registry of methods (see :mod:`models.registry`); importing registers them all."""

from models import unet  # noqa: F401  (each import registers its methods)
from models.registry import build_model, list_methods, method_entry, register_method

__all__ = ["build_model", "list_methods", "method_entry", "register_method"]
