"""A GGUF file as a model folder under a model root: `python -m workers.import_gguf FILE DIR`.

Jobs train safetensors folders (`service/model_catalog.py`). Transformers reads GGUF but will not
save a model loaded from it, so this dequantizes the file into float32 safetensors, the way the
embedded default model is converted (`workers/engine/models.py`), and checks the copy: same
tokenizer, same chat template, same weights, same greedy continuation. It writes into a sibling
temporary folder and renames it into place, so a root never shows half a model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from workers.engine.models import CACHE_MANIFEST, ModelError, convert, load_gguf


def import_gguf(gguf: Path, target: Path) -> dict:
    """Convert `gguf` into the new folder `target`; returns what the check recorded."""
    if target.exists():
        raise ModelError("exists", f"{target} exists; choose a new folder")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model, tokenizer = load_gguf(gguf)
        manifest = convert(model, tokenizer, partial)
        (partial / CACHE_MANIFEST).write_text(json.dumps({**manifest, "gguf_file": gguf.name}, indent=2))
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.import_gguf", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("target", type=Path, help="a new folder, e.g. /models/my-model (its id: my-model)")
    args = parser.parse_args(argv)
    try:
        import_gguf(args.gguf, args.target)
    except (ModelError, OSError, ValueError) as exc:
        print(f"import_gguf: {exc}", file=sys.stderr)
        return 1
    print(args.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
