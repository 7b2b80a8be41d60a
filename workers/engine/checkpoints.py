"""Checkpoints: written atomically, verified by hash, rotated, and everything a resume restores.

A checkpoint is `<out_dir>/checkpoints/step-{step:06d}/`: the weights (the LoRA adapter, or the
full model; with `merge_on_save` also `merged/`, the full weights with the adapter folded in), the
tokenizer, `optimizer.pt`, `trainer_state.json` (step, data position, RNG states, metrics history,
config) and `manifest.json`, the sha256 and size of every other file. It is written into
`step-XXXXXX.tmp`, the manifest last and fsynced, then renamed into place: a directory is a
checkpoint only if its manifest is there and every hash matches (`verify_checkpoint`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.engine.config import TrainConfig
from workers.engine.hooks import Hooks

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
MERGED = "merged"
STATE_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d{6,})$")

# Config fields that fix the data order or the shape of what is trained: a resume must not change
# them, or the checkpoint's step would point at different data / different parameters.
_RESUME_FIXED = (
    "objective",
    "dpo",
    "method",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "micro_batch_size",
    "micro_batch_tokens",
    "grad_accum",
    "max_seq_len",
    "seed",
)


class CheckpointStore:
    """The checkpoints of one run, under `root` (`<out_dir>/checkpoints/step-XXXXXX/`)."""

    def __init__(self, root: Path, hooks: Hooks):
        self.root, self.hooks = root, hooks
        root.mkdir(parents=True, exist_ok=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, after removing interrupted writes (`*.tmp`) and broken
        checkpoints newer than it, each reported as a `checkpoint_ignored` event."""
        self._remove_temp_dirs()
        return self._latest_valid()

    def save(
        self,
        step: int,
        model: Any,
        tokenizer: Any,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict[str, Any],
        config: TrainConfig,
        state: dict[str, Any],
        base_model: str,
        lineage: dict[str, Any] | None = None,
    ) -> tuple[Path, dict[str, Any]]:
        """Write checkpoint `step` atomically: into step-XXXXXX.tmp, manifest.json last, then renamed.
        `weights` and `optimizer_state` are the model's and the optimiser's state dicts with whole
        tensors (`Ranks.full_state`): `model` gives their layout and config, not their values."""
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f"step-{step:06d}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        if final.exists():  # left by an earlier run and found corrupt, or a rerun past a resume
            shutil.rmtree(final)
        tmp.mkdir()
        rng = rng_state()  # saving must not move the RNG: an uninterrupted run and a resumed one agree
        if config.method == "lora":
            # save_embedding_layers=False: the vocabulary is never resized here, and "auto" would look
            # the base model up on the Hub.
            model.save_pretrained(
                tmp, safe_serialization=True, save_embedding_layers=False, state_dict=weights
            )
            if config.merge_on_save:
                save_merged(model, tmp / MERGED, weights)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            if (tmp / MERGED).is_dir():  # merged weights are a complete model: loadable, trainable further
                tokenizer.save_pretrained(tmp / MERGED)
        torch.save(optimizer_state, tmp / OPTIMIZER)
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        set_rng_state(rng)

        manifest = {
            "step": step,
            "files": _hash_files(tmp),
            "metrics": state["metrics"][-1] if state["metrics"] else {},
            "base_model": base_model,
            "method": config.method,
            **({"lineage": lineage} if lineage else {}),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))
        os.replace(tmp, final)
        _fsync_dir(self.root)
        return final, manifest

    def rotate(self, keep: int) -> None:
        """Keep the newest `keep` checkpoints."""
        for _step, path in checkpoint_dirs(self.root)[keep:]:
            shutil.rmtree(path, ignore_errors=True)

    def _remove_temp_dirs(self) -> None:
        for path in self.root.glob("*.tmp"):
            self.hooks.event(
                "warning",
                "checkpoint_ignored",
                f"removing {path.name}: a checkpoint interrupted while being written",
                {"path": str(path)},
            )
            shutil.rmtree(path, ignore_errors=True)

    def _latest_valid(self) -> Path | None:
        """The newest complete checkpoint. Broken ones newer than it are reported and removed (the
        run will write those steps again); older ones are left alone."""
        for _step, path in checkpoint_dirs(self.root):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            self.hooks.event(
                "warning",
                "checkpoint_ignored",
                f"ignoring checkpoint {path.name}: {problem}",
                {"path": str(path), "reason": problem},
            )
            shutil.rmtree(path, ignore_errors=True)
        return None


def save_merged(peft_model: Any, directory: Path, weights: dict[str, torch.Tensor]) -> None:
    """Full weights with the adapter folded in, without touching the training model.

    `merge_and_unload` would rewrite the base weights in place (and merge/unmerge leaves rounding
    in them); a deepcopy doubles the model's memory. Instead the merged tensors are computed into a
    fresh state dict, under the base model's own key names, and saved with its save_pretrained.
    They come from `weights`, the peft model's state dict with whole tensors (a sharded run's
    gathered): each adapted weight plus `B @ A * scaling`, as peft's `get_delta_weight` computes
    it for a Linear layer.
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    prefix = next(name for name, module in peft_model.named_modules() if module is inner)
    prefix = f"{prefix}." if prefix else ""
    deltas = {}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if not (isinstance(module, LoraLayer) and "default" in module.lora_A):
                continue
            if module.use_dora.get("default") or getattr(module, "fan_in_fan_out", False):
                raise ValueError(f"cannot merge {name}: DoRA and fan-in-fan-out layers are not supported")
            a = weights[f"{prefix}{name}.lora_A.default.weight"]
            b = weights[f"{prefix}{name}.lora_B.default.weight"]
            deltas[f"{name}.weight"] = (b.float() @ a.float()) * module.scaling["default"]
        merged = {}
        for key, value in weights.items():
            key = key.removeprefix(prefix)
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            merged[key] = (value + deltas[key].to(value.dtype)) if key in deltas else value
    missing = set(deltas) - set(merged)
    if missing:
        raise RuntimeError(f"could not merge LoRA weights into {sorted(missing)[:3]}")
    inner.save_pretrained(directory, state_dict=merged)


def _sha256(path: Path, *, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _hash_files(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `directory` but the manifest, each fsynced on the way."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": _sha256(path, fsync=True), "bytes": path.stat().st_size}
    return files


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories by name (complete or not), newest first."""
    found = []
    for path in ckpt_root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def verify_checkpoint(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (interrupted while writing)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = manifest["step"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    match = STEP_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        return f"manifest.json says step {step}"
    for rel in (TRAINER_STATE, OPTIMIZER):
        if rel not in files:
            return f"manifest.json does not list {rel}"
    for rel, info in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest.json says {info['bytes']}"
        if _sha256(file) != info["sha256"]:
            return f"{rel} does not match its sha256 in manifest.json"
    return None


def check_resumable(
    state: dict[str, Any], config: TrainConfig, base_model: str, fingerprint: str, hooks: Hooks
) -> None:
    if state.get("format_version") != STATE_VERSION:
        raise ValueError(f"checkpoint format {state.get('format_version')!r} is not {STATE_VERSION}")
    saved, now = state["config"], config.to_json()
    fixed = [k for k in _RESUME_FIXED if saved.get(k) != now[k]]
    if fixed:
        raise ValueError(
            "cannot resume: the checkpoint was trained with different "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in fixed)
        )
    if state["base_model"] != base_model:
        raise ValueError(f"cannot resume: the checkpoint is of {state['base_model']!r}, not {base_model!r}")
    if state["data"]["fingerprint"] != fingerprint:
        raise ValueError("cannot resume: the examples differ from those the checkpoint was trained on")
    changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if changed:
        hooks.event(
            "info",
            "config_changed",
            "resuming with changed " + ", ".join(sorted(changed)),
            {k: {"was": a, "now": b} for k, (a, b) in changed.items()},
        )


def load_weights(model: Any, ckpt: Path, config: TrainConfig) -> None:
    from safetensors.torch import load_file

    if config.method == "lora":
        from peft import set_peft_model_state_dict

        weights = load_file(ckpt / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"checkpoint adapter does not fit the model: {unexpected[:3]}")
        return
    weights = {}
    for file in sorted(ckpt.glob("*.safetensors")):  # one file or shards
        weights.update(load_file(file))
    result = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


# --- RNG state: saved with each checkpoint, restored on resume ---------------------------------


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in cuda])


def restore(
    path: Path,
    model: Any,
    config: TrainConfig,
    base_model: str,
    fingerprint: str,
    hooks: Hooks,
    *,
    weights: bool = True,
) -> dict[str, Any]:
    """Load checkpoint `path`'s weights into `model` (before it is sharded; not with `weights`
    False: a sharded rank that gets them from rank 0); its trainer state (step, metrics history,
    RNG states, ...), or ValueError if this run cannot continue it. The optimiser's state follows
    once the optimiser exists (`optimizer_state`), and the RNG states last."""
    state = json.loads((path / TRAINER_STATE).read_text())
    check_resumable(state, config, base_model, fingerprint, hooks)
    if weights:
        load_weights(model, path, config)
    return state


def optimizer_state(path: Path, device: torch.device) -> dict[str, Any]:
    """Checkpoint `path`'s optimiser state dict, its tensors on `device`."""
    # weights_only=True: torch.load refuses anything but tensors and plain containers, so a
    # tampered optimizer.pt cannot run code on load (a full pickle could).
    return torch.load(path / OPTIMIZER, map_location=device, weights_only=True)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], config: TrainConfig) -> None:
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # hyperparameters come from this config
        group["betas"] = config.betas
        group["weight_decay"] = config.weight_decay if group["name"] == "decay" else 0.0
