"""Python client of the GAtt fine-tuning service: `Client` (sync) and `AsyncClient`.

from gatt_client import Client
client = Client("http://127.0.0.1:8000", api_key="gatt_...")   # or GATT_URL, GATT_API_KEY
corpus = client.corpora.upload("dialogues.jsonl")
job = client.jobs.wait(client.jobs.create(corpus.id, config={"training": {"max_steps": 8}}).id)
client.jobs.download_checkpoint(job.id, dest="checkpoints")
"""

from gatt_client import models
from gatt_client.client import AsyncClient, Client, StreamItem
from gatt_client.errors import ApiError, ChecksumMismatch, GattError, RateLimited, StreamEnded

__version__ = "0.1.0"
__all__ = [
    "ApiError",
    "AsyncClient",
    "ChecksumMismatch",
    "Client",
    "GattError",
    "RateLimited",
    "StreamEnded",
    "StreamItem",
    "__version__",
    "models",
]
