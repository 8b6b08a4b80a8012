"""The store, below the entry points: SQLAlchemy 2 models, engines and sessions, the store
verbs (`store`, each taking `session=`), Alembic migrations, read-only `query`, and
`python -m db upgrade|query`.

Imports only `config`; never torch.
"""
