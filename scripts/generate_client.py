"""Regenerate the Python client's wire models from the API's OpenAPI document.

    .venv/bin/python scripts/generate_client.py [--check]

Writes `clients/python/gatt_client/openapi.json` (the document, as the app serves it) and
`clients/python/gatt_client/models.py` (pydantic models generated from it by
datamodel-code-generator, pinned in the dev extra). `--check` writes nothing and exits 1 when
either file differs from what the app would give now: the client never drifts from the API
(tests/client/test_contract.py runs it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clients" / "python" / "gatt_client"
SPEC = PACKAGE / "openapi.json"
MODELS = PACKAGE / "models.py"
HEADER = '"""The API\'s request and response models, generated from openapi.json by\n`scripts/generate_client.py`: do not edit by hand."""\n\n'
OPTIONS = [
    "--input-file-type=openapi",
    "--output-model-type=pydantic_v2.BaseModel",
    "--use-annotated",
    "--field-constraints",
    "--target-python-version=3.11",
    "--use-standard-collections",
    "--use-union-operator",
    "--use-schema-description",
    "--disable-timestamp",
    "--use-type-alias",
    "--formatters=builtin",
]


def openapi_text() -> str:
    sys.path.insert(0, str(ROOT))
    from app.main import create_app

    return json.dumps(create_app().openapi(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def models_text(spec: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "openapi.json", Path(tmp) / "models.py"
        source.write_text(spec, encoding="utf-8")
        codegen = Path(sys.executable).with_name("datamodel-codegen")
        subprocess.run([str(codegen), f"--input={source}", f"--output={target}", *OPTIONS], check=True)
        return HEADER + target.read_text(encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are not up to date")
    args = parser.parse_args()
    spec = openapi_text()
    wanted = {SPEC: spec, MODELS: models_text(spec)}
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run scripts/generate_client.py", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
