#!/usr/bin/env bash
# The main job, end to end: set up, start Postgres/Redis if needed, migrate, start the API and a
# Celery worker, then run a GAtt job on the embedded model through the REST API and follow it.
# Where Postgres or Redis cannot be reached (or with GATT_FORCE_EMBEDDED=1), the same job runs through
# the same REST API on the embedded service instead: SQLite job state under GATT_EMBEDDED_DIR
# (default var/embedded), jobs run inside the API process (app/embedded.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
[ "${GATT_FORCE_EMBEDDED:-0}" = 1 ] || scripts/services.sh || true
PY=.venv/bin/python
export GATT_DATABASE_URL=${GATT_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/gatt}
export GATT_REDIS_URL=${GATT_REDIS_URL:-redis://127.0.0.1:6379/0}
export GATT_ARTIFACT_DIR=${GATT_ARTIFACT_DIR:-$PWD/var/artifacts}
export GATT_JOB_QUEUE=${GATT_JOB_QUEUE:-gpu-main-$$}   # a queue of its own: no other worker takes the job
PORT=${PORT:-8000}
mkdir -p var/log

missing=()
if [ "${GATT_FORCE_EMBEDDED:-0}" = 1 ]; then
  missing+=("GATT_FORCE_EMBEDDED=1 (Postgres and Redis not even tried)")
else
  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || missing+=("PostgreSQL is not reachable at 127.0.0.1:5432")
  redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 || missing+=("Redis is not reachable at 127.0.0.1:6379")
fi
if [ ${#missing[@]} -gt 0 ]; then
  export GATT_EMBEDDED_DIR=${GATT_EMBEDDED_DIR:-$PWD/var/embedded}
  printf '%s\n' "${missing[@]/#/EMBEDDED MODE: }"
  echo "EMBEDDED MODE: running the same job through the same REST API on the embedded service: job state in"
  echo "  SQLite ($GATT_EMBEDDED_DIR/gatt.sqlite3), jobs run one at a time inside the API process (no Celery)."
  KEY=$($PY -m app.embedded create-key "main-$(date +%Y%m%d%H%M%S)" --name main | grep -o 'gatt_[A-Za-z0-9_-]*' | head -1)
  .venv/bin/uvicorn --factory app.embedded:factory --host 127.0.0.1 --port "$PORT" >var/log/api-embedded.log 2>&1 &
  API=$!
  trap 'kill $API 2>/dev/null || true' EXIT
  for _ in $(seq 1 60); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 1; done
  curl -fsS "http://127.0.0.1:$PORT/readyz" && echo
  echo "API on http://127.0.0.1:$PORT (embedded mode; docs at /docs), API and worker logs in var/log/api-embedded.log"
  $PY scripts/main_job.py --url "http://127.0.0.1:$PORT" --key "$KEY"
  echo "artifacts under $GATT_EMBEDDED_DIR/artifacts (embedded mode)"
  exit 0
fi
createdb -h 127.0.0.1 -U postgres gatt 2>/dev/null || true
.venv/bin/alembic upgrade head

team="main-$(date +%Y%m%d%H%M%S)"
$PY -m app.admin create-team "$team" >/dev/null
KEY=$($PY -m app.admin create-key "$team" --name main | grep -o 'gatt_[A-Za-z0-9_-]*' | head -1)

.venv/bin/uvicorn app.main:app --host 127.0.0.1 --port "$PORT" >var/log/api.log 2>&1 &
API=$!
.venv/bin/celery -A workers.celery_app worker -B -s var/celerybeat-schedule -Q "$GATT_JOB_QUEUE,default" --pool solo \
  --loglevel INFO >var/log/worker.log 2>&1 &
WORKER=$!
# SIGQUIT: Celery's cold shutdown, so that a failed run does not leave the worker finishing its job.
trap 'kill $API 2>/dev/null; kill -QUIT $WORKER 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 1; done

echo "API on http://127.0.0.1:$PORT (docs at /docs), worker logs in var/log/worker.log"
$PY scripts/main_job.py --url "http://127.0.0.1:$PORT" --key "$KEY"
echo "artifacts under $GATT_ARTIFACT_DIR"
