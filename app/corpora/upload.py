"""Reading a multipart corpus upload as it streams in.

Starlette's form parsing has no limit on file parts and FastAPI runs it before any dependency, so an
unauthenticated client could send any amount before hearing 401. Here the upload is a dependency that
runs after authentication, counts the file's bytes as they arrive and stops at `max_corpus_bytes`
with a 413. The file goes to a spooled temporary file (memory up to 1 MiB, then disk).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from tempfile import SpooledTemporaryFile
from typing import IO, Any, BinaryIO, cast

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import UploadFile

from app.core.body_limit import set_body_limit
from app.core.db import SettingsDep
from app.core.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

SPOOL_MAX_BYTES = 1024 * 1024
# Room for boundaries, part headers and the name field on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_NAME_BYTES = 1024
NAME_MAX_CHARS = 100
FIELDS = ("file", "name")

# The request body as documented in the OpenAPI (the route parses it itself, see above).
OPENAPI_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": "The corpus: JSONL, one dialogue per line, "
                        '`{"id"?: str, "messages": [{"role": "system"|"user"|"assistant", "content": str}]}`.',
                    },
                    "name": {
                        "type": "string",
                        "maxLength": NAME_MAX_CHARS,
                        "description": "A label for the corpus; defaults to the file name.",
                    },
                },
            }
        }
    },
}


@dataclass
class CorpusUpload:
    file: IO[bytes]
    size: int
    name: str


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_field: bytes = b""
    header_value: bytes = b""
    field_name: str | None = None
    filename: str | None = None


class _Reader:
    """python-multipart callbacks; file data is queued and written by the async caller."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.part = _Part()
        self.seen: set[str] = set()
        self.file_size = 0
        self.filename: str | None = None
        self.name = bytearray()
        self.pending: list[bytes] = []

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.part.header_field.lower()] = self.part.header_value
        self.part.header_field = self.part.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in FIELDS:
            raise Unprocessable(
                f"Unexpected form field {name!r}; expected 'file' and optionally 'name'.",
                code="invalid_request",
                param=name or None,
            )
        if name in self.seen:
            raise Unprocessable(
                f"The form field {name!r} was given twice.", code="invalid_request", param=name
            )
        self.seen.add(name)
        self.part.field_name = name
        if name == "file" and b"filename" in options:
            self.filename = options[b"filename"].decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self.part.field_name == "file":
            self.file_size += n
            if self.file_size > self.max_file_bytes:
                raise PayloadTooLarge(
                    f"The corpus file is larger than the limit of {self.max_file_bytes} bytes.", param="file"
                )
            self.pending.append(bytes(data[start:end]))
        else:
            self.name += data[start:end]
            if len(self.name) > MAX_NAME_BYTES:
                raise Unprocessable("The name is too long.", code="invalid_request", param="name")

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }


def _display_name(name_field: bytes | None, filename: str | None) -> str:
    if name_field is not None:
        try:
            name = name_field.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Unprocessable(
                "The name is not valid UTF-8.", code="invalid_request", param="name"
            ) from None
        if not name:
            raise Unprocessable("The name must not be empty.", code="invalid_request", param="name")
        if "\x00" in name:  # Postgres text cannot hold it
            raise Unprocessable(
                "The name must not contain NUL characters.", code="invalid_request", param="name"
            )
        if len(name) > NAME_MAX_CHARS:
            raise Unprocessable(
                f"The name is longer than {NAME_MAX_CHARS} characters.", code="invalid_request", param="name"
            )
        return name
    if filename:
        # Browsers may send a full client-side path; keep its last component only.
        base = PureWindowsPath(PurePosixPath(filename.replace("\x00", "")).name).name.strip()
        if base:
            return base[:NAME_MAX_CHARS]
    return "corpus"


async def read_corpus_upload(request: Request, settings: SettingsDep) -> AsyncIterator[CorpusUpload]:
    """The uploaded corpus file and its name, read with a byte limit. Use after authentication."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UnsupportedMediaType(
            "Upload the corpus as multipart/form-data with a 'file' part.", param="file"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("The multipart Content-Type has no boundary.", param="file")
    set_body_limit(request, settings.max_corpus_bytes + MULTIPART_OVERHEAD_BYTES)

    reader = _Reader(settings.max_corpus_bytes)
    upload = UploadFile(cast(BinaryIO, SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES)))  # noqa: SIM115 (closed below)
    try:
        try:
            parser = MultipartParser(boundary, reader.callbacks())
            async for chunk in request.stream():
                parser.write(chunk)
                for data in reader.pending:
                    # UploadFile.write moves to a worker thread once the file spilled to disk.
                    await upload.write(data)
                reader.pending.clear()
            parser.finalize()
        except MultipartParseError as e:
            raise BadRequest(f"Malformed multipart body: {e}", param="file") from e
        if "file" not in reader.seen:
            raise Unprocessable(
                "No corpus: send the JSONL as the form field 'file'.", code="invalid_request", param="file"
            )
        await upload.seek(0)
        name = _display_name(bytes(reader.name) if "name" in reader.seen else None, reader.filename)
        yield CorpusUpload(file=upload.file, size=reader.file_size, name=name)
    finally:
        await upload.close()
