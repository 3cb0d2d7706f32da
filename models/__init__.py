"""Network code: one registry of methods (see :mod:`models.registry`); importing registers them all."""

from models import unet  # noqa: F401  (each import registers its methods)
from models import ic_polypseg  # noqa: F401
from models import pranet  # noqa: F401
from models import hrnet_lowrank, unet_r34_gradcam  # noqa: F401
from models import fcn, if_nets, resunetpp  # noqa: F401
from models import cris, segnet, unetpp  # noqa: F401
from models import gfl_atss  # noqa: F401
from models.registry import build_model, check_kwargs, list_methods, method_entry, method_task, register_method

__all__ = ["build_model", "check_kwargs", "list_methods", "method_entry", "method_task", "register_method"]
