"""The GAtt engine: runs one job's stages (synthesize; sample, with reward ranking turn by turn; train) from a typed
config, with no database and no Celery, so it runs wherever a GPU is. Celery tasks stay thin
wrappers around it."""
