"""The control plane's core: study spec, storage, samplers, pruners and the scheduler.

Nothing here imports FastAPI; `hpo.api` maps this core onto HTTP. Importing this package is
cheap (the notebook client uses :mod:`hpo.service.spec`), so heavy modules load on demand.
"""
