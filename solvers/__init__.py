"""Who solves, sorted by role: :mod:`.methods` (production torch methods, one module each), :mod:`.backends`
(reference backends, one module each), :mod:`.verification` (the cross-check harness and the certificates),
:mod:`.whole_model` (the allocation and depth solvers); the registry (:mod:`.registry`) and the interfaces they
share (:mod:`.base`) at the top."""
from .base import Backend, Capabilities, LayerResult, LicenseLimitError, SolveResult, SolverUnavailable
from .registry import (Option, Range, RegistrationError, UnknownMethodError, UnknownOptionError, get_backend, get_method,
                       list_backends, list_methods, register_backend, register_method)
