"""The models a job may fine-tune: the embedded default and every model directory under the roots.

A model is named by a stable id, never by a server path: `default`, or the directory's path relative
to its root (`llama-2-7b-chat`, or `meta-llama/Llama-2-7b-chat-hf` one level down, as the Hub lays
folders out). The first root that holds an id wins. The API lists the catalog (`GET /v1/models`) and
checks a request's model against it; a worker turns the id back into a directory with `resolve`.

Checking a directory reads headers, never weights: `config.json`, the safetensors headers (for the
parameter count and dtype), the tokenizer files and the chat template, which is rendered with
jinja2 and encoded with the `tokenizers` library to find the end-of-turn token the loss masks will
use. This module imports neither torch nor transformers (the API loads no model): transformers'
own rendering runs in the worker, which checks the model again when it loads it. A result is cached
until a file it read changes (its size or mtime).

Refused, each with a stable reason code: weights only as pickles (`unsafe_weights`), no weights or
no `config.json` (`invalid_model`), a config that asks for remote code (`remote_code`), no chat
template or no special token that closes a turn (`no_chat_template`, `no_end_of_turn`), and any
entry at any depth, or any shard named by an index, that resolves outside the root
(`path_not_allowed`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_ID = "default"
ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# An id is one or two folder names; anything else under a root is not offered.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_DEPTH = 2
# Bounds on what a check reads: roots are the operator's, but a stray huge file must not stall the API.
MAX_JSON_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_ENTRIES = 10_000
MAX_MODELS = 1_000
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


@dataclass(frozen=True)
class ModelInfo:
    """What the catalog knows of one model. `reason` is set exactly when it cannot be trained."""

    id: str
    source: str  # "embedded" or "local"
    architecture: str | None = None
    parameters: int | None = None
    context_length: int | None = None
    dtype: str | None = None
    chat_template: bool = False
    end_of_turn: str | None = None
    reason: str | None = None  # a stable code
    detail: str | None = None  # what to do about it, without server paths
    directory: Path | None = field(default=None, compare=False, repr=False)  # never shown

    @property
    def trainable(self) -> bool:
        return self.reason is None


# The embedded SmolLM2-135M-Instruct, as workers/engine/models.py converts it (tests/workers/
# test_model_catalog.py checks these against the converted directory). The API does not convert it.
EMBEDDED = ModelInfo(
    id=DEFAULT_ID,
    source="embedded",
    architecture="LlamaForCausalLM",
    parameters=134_515_008,
    context_length=8192,
    dtype="float32",
    chat_template=True,
    end_of_turn="<|im_end|>",
)


class ModelNotFound(LookupError):
    """No usable model with that id; the message names the id only."""

    def __init__(self, model_id: str, info: ModelInfo | None = None):
        self.model_id, self.info = model_id, info
        if info is None:
            message = f"no model {model_id!r} on this server; GET /v1/models lists them"
        else:
            message = f"model {model_id!r} cannot be trained: {info.detail} [{info.reason}]"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------
# The catalog


def catalog(roots: list[Path]) -> list[ModelInfo]:
    """The default model, then every model under `roots` (first root first, ids sorted)."""
    models = [EMBEDDED]
    seen = {DEFAULT_ID}
    for root in roots:
        for model_id, directory in _candidates(root):
            if model_id in seen:
                continue  # an earlier root holds this id
            seen.add(model_id)
            models.append(inspect(directory, root, model_id))
            if len(models) > MAX_MODELS:
                log.warning("more than %d model directories under the roots; listing the first", MAX_MODELS)
                return models
    return models


def find(model_id: str, roots: list[Path]) -> ModelInfo:
    """The model with this id (trainable or not), or ModelNotFound."""
    if model_id == DEFAULT_ID:
        return EMBEDDED
    parts = model_id.split("/")
    if not 1 <= len(parts) <= MAX_DEPTH or not all(_SEGMENT.match(p) for p in parts):
        raise ModelNotFound(model_id)
    for root in roots:
        directory = root / model_id
        if directory.is_dir() and _is_model_dir(directory):
            return inspect(directory, root, model_id)
    raise ModelNotFound(model_id)


def resolve(model_id: str, roots: list[Path]) -> Path | None:
    """The directory of a trainable model (None for the embedded default), or ModelNotFound."""
    info = find(model_id, roots)
    if not info.trainable:
        raise ModelNotFound(model_id, info)
    return info.directory


def id_of_path(path: str, roots: list[Path]) -> str | None:
    """The id of an absolute model path given the old way (`/models/x` -> `x`), if it names one."""
    candidate = Path(path)
    if not candidate.is_absolute() or ".." in candidate.parts:
        return None
    for root in roots:
        if candidate.is_relative_to(root):
            relative = candidate.relative_to(root).as_posix()
            parts = relative.split("/")
            if 1 <= len(parts) <= MAX_DEPTH and all(_SEGMENT.match(p) for p in parts):
                return relative
    return None


def parse_roots(value: Any) -> list[Path]:
    """Model roots as the operator writes them: a list, a JSON list, or paths joined by `:`."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ValueError(f"not a JSON list of paths: {text[:200]}") from None
        else:
            value = [part for part in text.split(":") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ValueError("give model roots as paths joined by ':' or as a JSON list")
    return [Path(str(v).strip()) for v in value]


def check_roots(roots: list[Path]) -> list[Path]:
    """Each root absolute and an existing directory; returned resolved (symlinks followed once, here)."""
    checked = []
    for root in roots:
        if not root.is_absolute():
            raise ValueError(f"model root {str(root)!r} is not an absolute path")
        if not root.is_dir():
            raise ValueError(f"model root {str(root)!r} is not an existing directory")
        checked.append(root.resolve())
    return checked


def _candidates(root: Path) -> list[tuple[str, Path]]:
    """(id, directory) of every folder that looks like a model, one or two levels down."""
    found: list[tuple[str, Path]] = []
    try:
        first = sorted(p for p in root.iterdir() if p.is_dir() and _SEGMENT.match(p.name))
    except OSError as exc:
        log.warning("cannot list model root %s: %s", root, exc)
        return found
    for directory in first:
        if _is_model_dir(directory):
            found.append((directory.name, directory))
            continue
        try:
            second = sorted(p for p in directory.iterdir() if p.is_dir() and _SEGMENT.match(p.name))
        except OSError:
            continue
        nested = [(f"{directory.name}/{p.name}", p) for p in second if _is_model_dir(p)]
        # A folder holding neither a model nor models is shown, so that a mistake is visible.
        found.extend(nested or [(directory.name, directory)])
    return found


def _is_model_dir(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("config.json", ADAPTER_CONFIG)) or any(
        p.suffix in (".safetensors", *PICKLE_SUFFIXES) for p in _files(directory)
    )


def _files(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_file()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# Checking one directory


_cache: dict[tuple[str, str], tuple[tuple[Any, ...], ModelInfo]] = {}
_cache_lock = threading.Lock()


def inspect(directory: Path, root: Path, model_id: str) -> ModelInfo:
    """The checked description of the model in `directory`, from the cache while its files are unchanged."""
    key = (str(directory), model_id)
    stamp = _stamp(directory)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    info = _inspect(directory, root.resolve(), model_id)
    with _cache_lock:
        _cache[key] = (stamp, info)
    return info


def _stamp(directory: Path) -> tuple[Any, ...]:
    """What changes when a file the check reads changes: every top-level entry's name, size, mtime."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
        return tuple((e.name, *_stat(e)) for e in entries[:MAX_ENTRIES])
    except OSError:
        return ()


def _stat(entry: os.DirEntry[str]) -> tuple[int, int]:
    try:
        st = entry.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _inspect(directory: Path, root: Path, model_id: str) -> ModelInfo:
    info = ModelInfo(id=model_id, source="local", directory=directory.resolve())
    try:
        return _check(directory, root, info)
    except _Refused as refused:
        return replace(info, reason=refused.code, detail=refused.detail)


class _Refused(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def _check(directory: Path, root: Path, info: ModelInfo) -> ModelInfo:
    _confined(directory, root)
    names = {p.name for p in _files(directory)}
    if ADAPTER_CONFIG in names:
        raise _Refused(
            "adapter",
            "a LoRA adapter, not a model: put the merged weights here, or continue a job's checkpoint "
            'with "model": {"job_id": ...}',
        )
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise _Refused(
                "unsafe_weights",
                f"weights only as pickle files ({', '.join(pickles[:3])}), which can run code when "
                "loaded; convert them to safetensors",
            )
        raise _Refused("invalid_model", "no weights (*.safetensors)")
    if "config.json" not in names:
        raise _Refused("invalid_model", "no config.json; is it a Hugging Face model directory?")
    config = _json(directory / "config.json")
    if config.get("auto_map"):
        raise _Refused(
            "remote_code", "its config.json asks for remote code (auto_map), which this service never runs"
        )
    _shards_confined(directory, weights, names)
    parameters, dtypes = _weights_summary([directory / n for n in weights])
    architectures = config.get("architectures") or []
    info = replace(
        info,
        architecture=str(architectures[0]) if architectures else config.get("model_type"),
        parameters=parameters,
        context_length=next((int(config[k]) for k in _CONTEXT_KEYS if isinstance(config.get(k), int)), None),
        dtype=max(dtypes, key=dtypes.__getitem__) if dtypes else None,
    )
    template = _chat_template(directory, names)
    if template is None:
        raise _Refused(
            "no_chat_template",
            "its tokenizer has no chat template; GAtt builds its examples and loss masks from it",
        )
    info = replace(info, chat_template=True)
    return replace(info, end_of_turn=_end_of_turn(directory, names, template))


def _confined(directory: Path, root: Path) -> None:
    """Every entry below `directory`, at any depth, resolves inside `root` (a link may point
    elsewhere inside it, not out)."""
    if not directory.resolve().is_relative_to(root):
        raise _Refused("path_not_allowed", "the model directory links outside the model root")
    seen = 0
    for top, dirs, files in os.walk(directory, followlinks=False):
        for name in (*dirs, *files):
            seen += 1
            if seen > MAX_ENTRIES:
                raise _Refused("invalid_model", f"more than {MAX_ENTRIES} files")
            if not (Path(top) / name).resolve().is_relative_to(root):
                raise _Refused(
                    "path_not_allowed",
                    f"{_relative(Path(top) / name, directory)} links outside the model root",
                )


def _shards_confined(directory: Path, weights: list[str], names: set[str]) -> None:
    """Shards named by an index file lie in the directory itself (and are there)."""
    for index in sorted(n for n in names if n.endswith(".safetensors.index.json")):
        weight_map = _json(directory / index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise _Refused("invalid_model", f"{index} has no weight_map")
        for shard in set(map(str, weight_map.values())):
            path = (directory / shard).resolve()
            if path.parent != directory.resolve() or shard not in weights:
                raise _Refused("path_not_allowed", f"{index} names a shard outside the model directory")


def _relative(path: Path, directory: Path) -> str:
    return path.relative_to(directory).as_posix()


def _json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise _Refused("invalid_model", f"{path.name} is larger than {MAX_JSON_BYTES} bytes")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _Refused("invalid_model", f"{path.name} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise _Refused("invalid_model", f"{path.name} is not a JSON object")
    return value


def _weights_summary(files: list[Path]) -> tuple[int, dict[str, int]]:
    """Parameter count and {dtype: parameters}, from each safetensors file's header alone."""
    total, dtypes = 0, {}
    for path in files:
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > MAX_HEADER_BYTES:
                    raise _Refused("invalid_model", f"{path.name} has an implausible header")
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            raise _Refused("invalid_model", f"{path.name} is not a safetensors file") from None
        for name, tensor in header.items():
            if name == "__metadata__" or not isinstance(tensor, dict):
                continue
            count = 1
            for dim in tensor.get("shape", []):
                count *= int(dim)
            total += count
            dtype = _DTYPE_NAMES.get(str(tensor.get("dtype")), str(tensor.get("dtype")).lower())
            dtypes[dtype] = dtypes.get(dtype, 0) + count
    return total, dtypes


_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def _chat_template(directory: Path, names: set[str]) -> str | None:
    if "chat_template.jinja" in names:
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if "tokenizer_config.json" in names:
        template = _json(directory / "tokenizer_config.json").get("chat_template")
        if isinstance(template, str) and template:
            return template
        if isinstance(template, list):  # named templates: the default one is what is applied
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            if isinstance(named.get("default"), str):
                return named["default"]
    if "chat_template.json" in names:
        template = _json(directory / "chat_template.json").get("chat_template")
        if isinstance(template, str) and template:
            return template
    return None


def _end_of_turn(directory: Path, names: set[str], template: str) -> str | None:
    """The special token that closes the probe reply, as gatt/masks.py finds it with transformers.

    None when the tokenizer has no `tokenizer.json` (a slow tokenizer only): the worker finds the
    token when it loads the model."""
    if "tokenizer.json" not in names:
        return None
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception:  # the Rust library raises its own exception type
        raise _Refused("invalid_model", "tokenizer.json is not readable") from None
    config = _json(directory / "tokenizer_config.json") if "tokenizer_config.json" in names else {}
    special = {
        k: _token_text(v) for k, v in config.items() if k.endswith("_token") and _token_text(v) is not None
    }

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # As transformers renders templates (chat_template_utils.py), so that the same ones render here.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
    env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False)
    try:
        compiled = env.from_string(template)
        prompt = compiled.render(messages=_PROBE[:1], add_generation_prompt=True, **special)
        whole = compiled.render(messages=_PROBE, add_generation_prompt=False, **special)
    except Exception as exc:  # any template error: the template cannot render a plain exchange
        raise _Refused(
            "no_chat_template", f"its chat template does not render ({type(exc).__name__})"
        ) from None
    specials = {t["id"]: t["content"] for t in _added_tokens(directory) if t.get("special")}
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    whole_ids = tokenizer.encode(whole, add_special_tokens=False).ids
    unk = config.get("unk_token")
    for token in whole_ids[len(prompt_ids) :]:
        if token in specials and specials[token] != _token_text(unk):
            return specials[token]
    raise _Refused(
        "no_end_of_turn",
        "its template closes a reply with no special token, so generation could not stop where "
        "training says a reply ends",
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_tokens(directory: Path) -> list[dict[str, Any]]:
    path = directory / "tokenizer.json"
    # tokenizer.json can be tens of MB; its added tokens are what we need, and it is read once per change.
    try:
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError):
        raise _Refused("invalid_model", "tokenizer.json is not readable JSON") from None
    return [t for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)]
