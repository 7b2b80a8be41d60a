"""The GAtt engine: runs one job's stages (synthesize, sample, rank, train, evaluate) from a typed
config, with no database and no Celery, so it runs wherever a GPU is. Celery tasks stay thin
wrappers around it."""
