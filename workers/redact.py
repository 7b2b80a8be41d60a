"""Server paths out of what a tenant reads: job errors and events are shown to the team, and an
absolute path there tells it how the server is laid out (its artifact directory, model cache,
home). A path under a model root becomes the model's id and the rest (`/models/llama/config.json`
-> `llama/config.json`): teams name models by id, and the root itself is the server's."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# An absolute POSIX path: a slash, then characters that are not space, quote or separator punctuation.
_PATH = re.compile(r"(?<![\w/.:])/[^\s'\"`,;()<>\[\]{}]+?(?=[.:]?(?:[\s'\"`,;()<>\[\]{}]|$))")


def server_paths(text: str, keep: Iterable[Path] = ()) -> str:
    """`text` with every absolute path under a root of `keep` (or its resolved form) made relative
    to it, and every other cut to `…/<last part>`, which still says which file."""
    roots = sorted(
        {str(p).rstrip("/") + "/" for root in keep for p in (Path(root), Path(root).resolve())}, key=len
    )

    def cut(match: re.Match[str]) -> str:
        path = match.group()
        for root in reversed(roots):  # the longest root first
            if path.startswith(root) and len(path) > len(root):
                return path[len(root) :]
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f"…/{name}" if name else "…"

    return _PATH.sub(cut, text)
