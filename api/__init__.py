"""HTTP side of hpo: the FastAPI app (``hpo.api.app``), the Python client (``hpo.api.client``)
and the ``hpo`` command line (``hpo.api.cli``).

The client and the CLI import neither FastAPI nor SQLAlchemy, so a notebook needs only
``pip install hpo``.
"""
