"""The service core, shared by the API (`app/`) and the Celery workers (`workers/`): settings, the
database and its models, all SQL (`service.repositories`), the artifact store and the job queue.

It imports neither FastAPI nor torch, and nothing above it (`.importlinter` in pyproject.toml).
"""
