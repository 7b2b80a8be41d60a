"""`service/model_catalog.py`: what `GET /v1/models` says of a model directory, checked against what
transformers and the loss masks find when they load it, and every way a directory is refused.

The catalog reads headers with jinja2 and `tokenizers` only (the API loads no torch); each expected
value here comes from the other side: parameter counts from the loaded torch model, the end-of-turn
token from gatt/masks.py on the transformers tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from gatt.masks import end_of_turn_token
from service import model_catalog
from service.model_catalog import EMBEDDED, ModelNotFound, catalog, find, resolve
from service.settings import Settings, get_settings
from tests.model_dirs import write_model
from workers.engine.models import default_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("template", ["chatml", "llama2", "llama3"])
def test_a_model_directory_is_described_as_transformers_and_the_masks_see_it(root, template) -> None:
    model = write_model(root / f"my-{template}", template)
    info = find(f"my-{template}", [root])
    tokenizer = AutoTokenizer.from_pretrained(root / f"my-{template}")
    assert info.trainable and info.source == "local", info
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert info.architecture == "LlamaForCausalLM" and info.context_length == 256
    assert info.dtype == "float32" and info.chat_template
    assert info.end_of_turn == tokenizer.convert_ids_to_tokens(end_of_turn_token(tokenizer))
    assert resolve(f"my-{template}", [root]) == (root / f"my-{template}").resolve()


def test_the_embedded_model_is_described_as_its_converted_copy(tmp_path) -> None:
    converted = default_model_dir()
    inspected = model_catalog.inspect(converted, converted.parent, "default")
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert EMBEDDED.parameters == sum(p.numel() for p in model.parameters()) == inspected.parameters
    assert EMBEDDED.end_of_turn == tokenizer.convert_ids_to_tokens(end_of_turn_token(tokenizer))
    fields = ("architecture", "context_length", "dtype", "chat_template", "end_of_turn")
    assert {f: getattr(EMBEDDED, f) for f in fields} == {f: getattr(inspected, f) for f in fields}
    assert resolve("default", []) is None  # the engine's own cache, not a root's


def test_ids_are_folders_one_or_two_levels_down_and_the_first_root_wins(tmp_path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    write_model(first / "shared")
    write_model(first / "org" / "chat")
    write_model(second / "shared", "llama3")
    write_model(second / "solo")
    (first / "empty").mkdir()
    (first / ".hidden").mkdir()
    models = {m.id: m for m in catalog([first, second])}
    assert list(models) == ["default", "empty", "org/chat", "shared", "solo"]
    assert models["shared"].end_of_turn == "<|im_end|>"  # the first root's, not the second's
    assert models["empty"].reason == "invalid_model" and not models["empty"].trainable
    for bad in ("../a/shared", "org/../shared", "/abs", "org/chat/extra", ".hidden", ""):
        with pytest.raises(ModelNotFound):
            find(bad, [first, second])


def test_unusable_directories_are_listed_with_the_reason(root) -> None:
    write_model(root / "pickled")
    (root / "pickled" / "model.safetensors").rename(root / "pickled" / "pytorch_model.bin")
    write_model(root / "remote")
    config = json.loads((root / "remote" / "config.json").read_text())
    (root / "remote" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    write_model(root / "plain")
    (root / "plain" / "chat_template.jinja").unlink()
    write_model(root / "adapter")
    (root / "adapter" / "adapter_config.json").write_text("{}")
    write_model(root / "noconfig")
    (root / "noconfig" / "config.json").unlink()
    reasons = {m.id: m.reason for m in catalog([root]) if m.id != "default"}
    assert reasons == {
        "adapter": "adapter",
        "noconfig": "invalid_model",
        "pickled": "unsafe_weights",
        "plain": "no_chat_template",
        "remote": "remote_code",
    }
    with pytest.raises(ModelNotFound) as refused:
        resolve("pickled", [root])
    assert "unsafe_weights" in str(refused.value) and str(root) not in str(refused.value)


def test_links_and_shards_that_leave_the_root_are_refused_at_any_depth(tmp_path, root) -> None:
    outside = tmp_path / "outside"
    write_model(outside / "weights")
    # A model linked in whole, a file linked from outside two folders down, a shard index that
    # names a file beside the directory.
    (root / "linked").symlink_to(outside / "weights")
    write_model(root / "deep")
    (root / "deep" / "extra" / "more").mkdir(parents=True)
    (root / "deep" / "extra" / "more" / "notes.txt").symlink_to(outside / "weights" / "config.json")
    write_model(root / "sharded")
    shard = root / "sharded" / "model.safetensors"
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "../stray.safetensors"}}
    (root / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(shard, root / "stray.safetensors")
    # A link that stays inside the root is fine.
    write_model(root / "inner")
    os.symlink(root / "deep" / "config.json", root / "inner" / "copy-of-config.json")
    reasons = {m.id: m.reason for m in catalog([root]) if m.id != "default"}
    assert reasons == {
        "deep": "path_not_allowed",
        "inner": None,
        "linked": "path_not_allowed",
        "sharded": "path_not_allowed",
    }


def test_a_check_is_cached_until_a_file_changes(root) -> None:
    write_model(root / "m")
    first = find("m", [root])
    assert find("m", [root]) is first  # the same object: nothing was read again
    config = json.loads((root / "m" / "config.json").read_text())
    (root / "m" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    assert find("m", [root]).context_length == 512


def test_model_roots_are_paths_joined_by_colons_or_json_and_must_exist(tmp_path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.setenv("GATT_MODEL_ROOTS", f"{a}:{b}")
    assert Settings().model_roots == [a, b]
    monkeypatch.setenv("GATT_MODEL_ROOTS", json.dumps([str(b)]))
    assert Settings().model_roots == [b]
    monkeypatch.setenv("GATT_MODEL_ROOTS", "")
    assert Settings().model_roots == []
    for bad, said in [
        (str(tmp_path / "nope"), "is not an existing directory"),
        ("models", "is not an absolute path"),
        ("[oops", "not a JSON list of paths"),
    ]:
        monkeypatch.setenv("GATT_MODEL_ROOTS", bad)
        get_settings.cache_clear()
        with pytest.raises(SystemExit) as stopped:
            get_settings()
        message = str(stopped.value)
        assert message.startswith("gatt: invalid settings: GATT_MODEL_ROOTS: ") and said in message
        assert "\n" not in message
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "command",
    [
        ["uvicorn", "app.main:app", "--port", "0"],
        ["celery", "-A", "workers.celery_app", "worker", "--pool", "solo"],
    ],
)
def test_a_process_with_bad_model_roots_stops_with_one_line(tmp_path, command) -> None:
    env = {**os.environ, "GATT_MODEL_ROOTS": str(tmp_path / "missing")}
    done = subprocess.run(
        [sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode != 0
    said = (done.stdout + done.stderr).strip()
    assert (
        said
        == f"gatt: invalid settings: GATT_MODEL_ROOTS: model root '{tmp_path / 'missing'}' is not an existing directory"
    )


def test_a_gguf_file_becomes_a_model_folder_under_a_root(root, capsys) -> None:
    from workers import import_gguf
    from workers.engine.models import embedded_gguf

    assert import_gguf.main([str(embedded_gguf()), str(root / "smol-from-gguf")]) == 0
    info = find("smol-from-gguf", [root])
    assert info.trainable and info.parameters == EMBEDDED.parameters and info.end_of_turn == "<|im_end|>"
    assert [p.name for p in root.iterdir()] == ["smol-from-gguf"]  # no partial folder left behind
    assert import_gguf.main([str(embedded_gguf()), str(root / "smol-from-gguf")]) == 1
    assert "exists" in capsys.readouterr().err
