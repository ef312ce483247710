"""What is solved: the layer problem, sparsity patterns and the declarative programs of every method."""
from .patterns import (NM, ColumnGroups, ExpanderNM, LinearRow, Pattern, PatternError, Unstructured,
                       check_sparsity, parse_pattern, pattern_kinds, register_pattern, register_projection)
from .problem import GramAccumulator, LayerProblem, NumericalError, cholesky_with_retry
from .programs import (Indicator, L1Penalty, LayerObjective, LinearScore, Program, Variable, grid_program, l0_program,
                       l1_kkt_residual, l1_program, mask_only_program, mask_program, refit_program)
from .subspace import Subspace, eigen_program  # noqa: E402  (registers the subspace pattern)
from .grid import GridSpec, Quantized, Quantizer, parse_grid
