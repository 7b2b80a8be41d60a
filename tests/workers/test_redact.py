"""Server paths are cut from what a team reads (workers/redact.py)."""

from __future__ import annotations

from pathlib import Path

from workers.redact import server_paths


def test_paths_outside_the_model_roots_keep_only_their_last_part() -> None:
    roots = [Path("/models")]
    assert (
        server_paths("cannot load a tokenizer from /root/.cache/gatt/smollm2: bad file", roots)
        == "cannot load a tokenizer from …/smollm2: bad file"
    )
    assert (
        server_paths("/models/llama has no config.json; see /var/lib/gatt/artifacts/t/j/corpus.jsonl.", roots)
        == "/models/llama has no config.json; see …/corpus.jsonl."
    )
    assert server_paths("ratio 1/2, a/b, http://host/x, (/srv/a) '/srv/b'", []) == (
        "ratio 1/2, a/b, http://host/x, (…/a) '…/b'"
    )
