"""Production methods: one module per method — its program builder, its torch solver
``fn(problem, pattern, **options) -> LayerResult`` and its ``@register_method`` — plus the helpers only methods use.

The registry imports every module of this package on first use (:mod:`optprune.solvers.registry`): adding a
method is adding a module here, never editing a list.
"""
