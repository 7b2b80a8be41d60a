"""Server paths are cut from what a team reads (workers/redact.py)."""

from __future__ import annotations

from pathlib import Path

from workers.redact import server_paths


def test_paths_under_a_model_root_become_ids_and_others_keep_only_their_last_part() -> None:
    roots = [Path("/models")]
    assert (
        server_paths("cannot load a tokenizer from /root/.cache/gatt/smollm2: bad file", roots)
        == "cannot load a tokenizer from …/smollm2: bad file"
    )
    assert (
        server_paths("/models/llama has no config.json; see /var/lib/gatt/artifacts/t/j/corpus.jsonl.", roots)
        == "llama has no config.json; see …/corpus.jsonl."
    )
    assert server_paths("ratio 1/2, a/b, http://host/x, (/srv/a) '/srv/b'", []) == (
        "ratio 1/2, a/b, http://host/x, (…/a) '…/b'"
    )
    assert server_paths("in /models/org/chat/x.json and /models", roots) == "in org/chat/x.json and …/models"
