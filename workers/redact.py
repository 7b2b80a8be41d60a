"""Server paths out of what a tenant reads: job errors and events are shown to the team, and an
absolute path there tells it how the server is laid out (its artifact directory, model cache,
home). Paths under the model roots stay: the team named them itself."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# An absolute POSIX path: a slash, then characters that are not space, quote or separator punctuation.
_PATH = re.compile(r"(?<![\w/.:])/[^\s'\"`,;()<>\[\]{}]+?(?=[.:]?(?:[\s'\"`,;()<>\[\]{}]|$))")


def server_paths(text: str, keep: Iterable[Path] = ()) -> str:
    """`text` with every absolute path outside `keep` (and their resolved forms) cut to
    `…/<last part>`, which still says which file."""
    roots = {str(p) for root in keep for p in (Path(root), Path(root).resolve())}

    def cut(match: re.Match[str]) -> str:
        path = match.group()
        if any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            return path
        name = path.rstrip("/").rsplit("/", 1)[-1]
        return f"…/{name}" if name else "…"

    return _PATH.sub(cut, text)
