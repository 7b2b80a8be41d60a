"""The job service's HTTP API: FastAPI on Postgres, one package per resource.

Reading map: `core/` (settings, database session, error envelope, pagination, body limits),
`models/` (the ORM tables), `auth/` (API keys and the `CurrentTeam` dependency), one package per
resource under `/v1` with the same four files (endpoints, service, repository, schemas), `main.py`
(`create_app`) and `admin.py` (teams and keys from the command line). Never imports torch.
"""
