"""ensemble: generalists, specialists and distillation (Hinton, Vinyals & Dean 2015) on Ray.

Importing this package (or any core module) never imports Ray; only `ensemble.actors`,
`ensemble.pipeline` and the CLI do.
"""
__version__ = "0.1.0"
