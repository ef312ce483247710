"""Who solves: reference backends and production torch methods behind one interface (see base.py)."""
from .base import Backend, Capabilities, LayerResult, LicenseLimitError, SolveResult, SolverUnavailable
from .registry import (Option, Range, RegistrationError, UnknownMethodError, UnknownOptionError, get_backend, get_method,
                       list_backends, list_methods, register_backend, register_method)
