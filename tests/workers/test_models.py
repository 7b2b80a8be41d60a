"""Model loading: the embedded SmolLM2 (dequantized once from GGUF), local directories, checkpoints.

Fast tests use a tiny random Llama with a small ChatML tokenizer trained here (no hub). The
`slow` ones load the real SmolLM2 GGUF once per session into a session-scoped cache folder;
GATT_CACHE_DIR points there for every test of this module, so nothing is written to $HOME.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.threads import one_torch_thread
from workers.engine import models as m
from workers.engine.models import (
    LoadedModel,
    ModelError,
    check_model_dir,
    default_model_dir,
    end_of_turn_ids,
    load_model,
    pick_device_dtype,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DIALOGUE = [
    {"role": "system", "content": "Always answer in French."},
    {"role": "user", "content": "Hello! How are you?"},
    {"role": "assistant", "content": "Bonjour ! Je vais bien."},
    {"role": "user", "content": "What is the capital of Spain?"},
]
SHORT = [{"role": "user", "content": "Name three colours."}]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gatt-cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, cache_root):
    monkeypatch.setenv("GATT_CACHE_DIR", str(cache_root))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    # Byte-level BPE like SmolLM2's, with ChatML control tokens; no pad token on purpose.
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([m["content"] for m in DIALOGUE] * 5, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny(directory: Path, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    model = make_model(len(tokenizer), seed)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model


@pytest.fixture
def tiny_dir(tmp_path, tokenizer) -> tuple[Path, LlamaForCausalLM]:
    directory = tmp_path / "tiny"
    return directory, save_tiny(directory, tokenizer)


def prompt_ids(tokenizer, messages=DIALOGUE) -> torch.Tensor:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def code_of(excinfo) -> str:
    return excinfo.value.code


# ---------------------------------------------------------------------------------------------
# Local directories and checkpoints (tiny model)


def test_local_dir_loads(tiny_dir, tokenizer):
    directory, reference = tiny_dir
    loaded = load_model(str(directory), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.source == str(directory) and loaded.base_dir == directory.resolve()
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    # No pad token in the saved tokenizer: EOS stands in; generation pads on the left.
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.pad_token_id
    assert loaded.tokenizer.chat_template == CHATML
    ids = prompt_ids(tokenizer)
    assert torch.equal(logits(loaded.model, ids), logits(reference, ids))


def test_allowed_roots_admit_inside(tiny_dir, tmp_path):
    directory, _ = tiny_dir
    loaded = load_model(str(directory), device="cpu", allowed_roots=[tmp_path])
    assert loaded.base_dir == directory.resolve()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_override(tiny_dir, dtype):
    directory, _ = tiny_dir
    loaded = load_model(str(directory), device="cpu", dtype=dtype)
    assert loaded.dtype == getattr(torch, dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}
    assert {p.device for p in loaded.model.parameters()} == {torch.device("cpu")}


def test_automatic_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device_dtype() == (torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_device_dtype() == (torch.device("cuda", 0), torch.bfloat16)
    assert pick_device_dtype("cuda:1") == (torch.device("cuda", 1), torch.bfloat16)
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype(dtype="float16") == (torch.device("cuda", 0), torch.float16)
    with pytest.raises(ModelError) as e:
        pick_device_dtype("cuda:2")
    assert code_of(e) == "invalid_device"
    # A GPU without bf16 (pre-Ampere) trains in float32 rather than float16 without loss scaling.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_device_dtype() == (torch.device("cuda", 0), torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_gpu(tiny_dir):
    with pytest.raises(ModelError) as e:
        load_model(str(tiny_dir[0]), device="cuda")
    assert code_of(e) == "invalid_device"


@pytest.mark.parametrize(
    ("device", "dtype", "code"),
    [
        ("tpu", None, "invalid_device"),
        ("cpu", "int8", "invalid_dtype"),
        ("nonsense!", None, "invalid_device"),
    ],
)
def test_bad_device_or_dtype(device, dtype, code):
    with pytest.raises(ModelError) as e:
        pick_device_dtype(device, dtype)
    assert code_of(e) == code


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default(tiny_dir):
    loaded = load_model(str(tiny_dir[0]))
    assert loaded.device.type == "cuda"
    assert next(loaded.model.parameters()).device == loaded.device
    assert loaded.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)


class _Boom:
    """Unpickling this writes a file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.mark.parametrize("with_config", [False, True])
def test_pickle_weights_refused(tmp_path, tokenizer, with_config):
    directory = tmp_path / "pickled"
    directory.mkdir()
    marker = tmp_path / "unpickled"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    if with_config:
        make_model(len(tokenizer)).config.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    with pytest.raises(ModelError) as e:
        load_model(str(directory), device="cpu")
    assert code_of(e) == "unsafe_weights"
    assert "safetensors" in str(e.value)
    assert not marker.exists()


def test_pickle_adapter_refused(tmp_path, tiny_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_dir[0])}))
    torch.save({}, adapter / "adapter_model.bin")
    with pytest.raises(ModelError) as e:
        load_model(str(adapter), device="cpu")
    assert code_of(e) == "unsafe_weights"


def test_safetensors_preferred_over_pickles(tiny_dir):
    # A trainer checkpoint may hold optimizer.pt next to safetensors weights; never read, no refusal.
    directory, _ = tiny_dir
    torch.save({}, directory / "optimizer.pt")
    assert load_model(str(directory), device="cpu").base_dir == directory.resolve()


def test_missing_dir(tmp_path):
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path / "nope"), device="cpu")
    assert code_of(e) == "model_not_found"


def test_file_or_incomplete_dir_is_invalid(tmp_path, tiny_dir):
    directory, _ = tiny_dir
    cases = [directory / "config.json", tmp_path / "empty"]
    (tmp_path / "empty").mkdir()
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    cases.append(no_config)
    for case in cases:
        with pytest.raises(ModelError) as e:
            load_model(str(case), device="cpu")
        assert code_of(e) == "invalid_model", case


def test_path_outside_allowed_roots(tmp_path, tiny_dir):
    directory, _ = tiny_dir
    root = tmp_path / "root"
    root.mkdir()
    for source in [directory, root / ".." / "tiny", tmp_path / "does-not-exist"]:
        with pytest.raises(ModelError) as e:
            load_model(str(source), device="cpu", allowed_roots=[root])
        assert code_of(e) == "path_not_allowed", source
    with pytest.raises(ModelError) as e:
        load_model(str(directory), device="cpu", allowed_roots=[])
    assert code_of(e) == "path_not_allowed"


def test_symlink_out_of_allowed_roots(tmp_path, tiny_dir):
    directory, _ = tiny_dir
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(directory, target_is_directory=True)
    with pytest.raises(ModelError) as e:
        load_model(str(root / "link"), device="cpu", allowed_roots=[root])
    assert code_of(e) == "path_not_allowed"
    # A real directory inside the root whose weights file links outside it.
    inner = root / "inner"
    inner.mkdir()
    for f in directory.iterdir():
        (inner / f.name).write_bytes(f.read_bytes())
    (inner / "model.safetensors").unlink()
    (inner / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(ModelError) as e:
        load_model(str(inner), device="cpu", allowed_roots=[root])
    assert code_of(e) == "path_not_allowed"
    # Symlinks that stay inside the root are fine.
    (root / "inside").symlink_to(directory, target_is_directory=True)
    assert (
        load_model(str(root / "inside"), device="cpu", allowed_roots=[tmp_path]).base_dir
        == directory.resolve()
    )


def test_no_chat_template(tmp_path):
    directory = tmp_path / "plain"
    save_tiny(directory, make_tokenizer(chat_template=None))
    with pytest.raises(ModelError) as e:
        load_model(str(directory), device="cpu")
    assert code_of(e) == "no_chat_template"


@pytest.mark.parametrize("weights", [True, False])
@pytest.mark.parametrize("model_type", ["evil", "llama"])
def test_remote_code_never_runs(tiny_dir, tmp_path, model_type, weights):
    directory, _ = tiny_dir
    marker = tmp_path / "remote-code-ran"
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "evil.EvilModel"})
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    if model_type == "evil":  # unknown without its code: refused
        with pytest.raises(ModelError) as e:
            load_model(str(directory), device="cpu", weights=weights)
        assert code_of(e) == "invalid_model"
    else:  # a known architecture: transformers' own class, the shipped code ignored
        assert type(load_model(str(directory), device="cpu", weights=weights).model) is LlamaForCausalLM
    assert not marker.exists()


def test_check_model_dir(tiny_dir, tmp_path):
    directory, _ = tiny_dir
    assert check_model_dir(directory, [tmp_path]) == directory.resolve()
    with pytest.raises(ModelError) as e:
        check_model_dir(directory, [tmp_path / "elsewhere"])
    assert code_of(e) == "path_not_allowed"


def _lora(model):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: random B, so the adapter really changes the logits.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, config).eval()


def test_a_lora_checkpoint_goes_on_as_its_own_adapter_or_merged(tmp_path, tokenizer):
    from gatt.augment import training_dialogue
    from gatt.masks import build_examples
    from workers.engine.config import TrainConfig, parse_config
    from workers.engine.pipeline import _job_model
    from workers.engine.training import train

    base_dir = tmp_path / "base"
    save_tiny(base_dir, tokenizer)
    peft_model = _lora(LlamaForCausalLM.from_pretrained(base_dir).eval())
    ckpt = tmp_path / "ckpt"
    peft_model.save_pretrained(ckpt, safe_serialization=True)
    (ckpt / "adapter_config.json").write_text(
        json.dumps(
            {**json.loads((ckpt / "adapter_config.json").read_text()), "base_model_name_or_path": "gone"}
        )
    )
    ids = prompt_ids(tokenizer)
    expected = logits(peft_model, ids)

    def load():  # the base given by the service, not the (stale) one the adapter names
        return load_model(str(ckpt), device="cpu", allowed_roots=[tmp_path], base=str(base_dir))

    with pytest.raises(ModelError) as e:
        _job_model(parse_config({"training": {"lora_r": 8, "lora_alpha": 8}}), load(), None)
    assert code_of(e) == "adapter_mismatch"

    merged = _job_model(parse_config({"training": {"method": "full"}}), load(), None)
    assert not hasattr(merged.model, "peft_config")
    assert torch.allclose(logits(merged.model, ids), expected, atol=1e-5)

    options = {"lora_r": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"], "max_steps": 1}
    same = _job_model(parse_config({"training": options}), load(), None)
    before = {n: p.detach().clone() for n, p in same.model.named_parameters() if "lora_" in n}
    dialogue = training_dialogue("Be brief.", [DIALOGUE[0]["content"]], [DIALOGUE[1]["content"]], [True])
    examples = build_examples(tokenizer, dialogue, "last_turn").examples
    result = train(
        same.model, tokenizer, examples, TrainConfig(**options), tmp_path / "out", base_model="mine"
    )
    assert result.model is same.model  # the checkpoint's adapter, not a new one on top
    after = dict(result.model.named_parameters())
    assert before.keys() == {n for n, p in after.items() if p.requires_grad}
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)
    saved = json.loads((Path(result.checkpoint) / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "mine" and saved["r"] == 4


def test_lora_checkpoint_loads(tmp_path, tokenizer):
    base_dir = tmp_path / "base"
    save_tiny(base_dir, tokenizer)
    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    peft_model = _lora(base)
    ckpt = tmp_path / "ckpt"
    peft_model.save_pretrained(ckpt, safe_serialization=True)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)

    loaded = load_model(str(ckpt), device="cpu", allowed_roots=[tmp_path])
    assert loaded.base_dir == base_dir.resolve() and loaded.source == str(ckpt)
    assert not loaded.model.training
    ids = prompt_ids(tokenizer)
    expected = logits(peft_model, ids)
    assert torch.equal(logits(loaded.model, ids), expected)
    assert not torch.allclose(expected, logits(LlamaForCausalLM.from_pretrained(base_dir).eval(), ids))


def test_without_weights_a_model_is_its_modules_on_the_meta_device(tmp_path, tokenizer):
    # What a sharded training rank other than 0 builds: the weights come from rank 0.
    base_dir = tmp_path / "base"
    save_tiny(base_dir, tokenizer)
    _lora(LlamaForCausalLM.from_pretrained(base_dir)).save_pretrained(tmp_path / "ckpt")
    for source in (base_dir, tmp_path / "ckpt"):
        whole = load_model(str(source), device="cpu", dtype="bfloat16")
        bare = load_model(str(source), device="cpu", dtype="bfloat16", weights=False)
        assert type(bare.model) is type(whole.model) and bare.tokenizer.chat_template == CHATML
        assert all(p.is_meta for p in bare.model.parameters())
        shapes = {n: (p.shape, p.dtype) for n, p in whole.model.named_parameters()}
        assert {n: (p.shape, p.dtype) for n, p in bare.model.named_parameters()} == shapes


def test_lora_base_is_checked_too(tmp_path, tokenizer):
    base_dir = tmp_path / "outside" / "base"
    save_tiny(base_dir, tokenizer)
    ckpt = tmp_path / "root" / "ckpt"
    _lora(LlamaForCausalLM.from_pretrained(base_dir)).save_pretrained(ckpt)
    with pytest.raises(ModelError) as e:
        load_model(str(ckpt), device="cpu", allowed_roots=[tmp_path / "root"])
    assert code_of(e) == "path_not_allowed"
    # A base that is missing, or not named at all.
    config = json.loads((ckpt / "adapter_config.json").read_text())
    for base, code in [(str(tmp_path / "gone"), "model_not_found"), (None, "invalid_model")]:
        (ckpt / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
        with pytest.raises(ModelError) as e:
            load_model(str(ckpt), device="cpu")
        assert code_of(e) == code


def test_full_weights_checkpoint(tmp_path, tokenizer):
    # What the trainer writes for full fine-tuning: model.safetensors + config.json (+ tokenizer).
    ckpt = tmp_path / "checkpoint-10"
    reference = save_tiny(ckpt, tokenizer, seed=3)
    assert (ckpt / "model.safetensors").is_file()
    loaded = load_model(str(ckpt), device="cpu")
    ids = prompt_ids(tokenizer)
    assert torch.equal(logits(loaded.model, ids), logits(reference, ids))


def test_end_of_turn_ids(tokenizer):
    # EOS (<|endoftext|>) differs from the template's end of turn (<|im_end|>): both stop.
    ids = end_of_turn_ids(tokenizer)
    assert ids == [
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    with pytest.raises(ModelError) as e:
        end_of_turn_ids(make_tokenizer(chat_template=None))
    assert code_of(e) == "no_chat_template"
    plain = make_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ModelError) as e:
        end_of_turn_ids(plain)
    assert code_of(e) == "no_end_of_turn"


# ---------------------------------------------------------------------------------------------
# The cache mechanics, with a tiny stand-in for the GGUF model (fast)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tokenizer):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def load(path):
        calls.append(path)
        return make_model(len(tokenizer)), make_tokenizer()

    monkeypatch.setattr(m, "embedded_gguf", lambda: gguf)
    monkeypatch.setattr(m, "load_gguf", load)
    return gguf, calls


def test_cache_built_once(tmp_path, fake_gguf):
    gguf, calls = fake_gguf
    root = tmp_path / "cache"
    first = default_model_dir(root)
    assert first.parent == root and len(calls) == 1
    assert {"model.safetensors", "config.json", "chat_template.jinja", m.CACHE_MANIFEST} <= {
        p.name for p in first.iterdir()
    }
    manifest = json.loads((first / m.CACHE_MANIFEST).read_text())
    assert manifest["gguf_sha256"][:16] in first.name
    assert default_model_dir(root) == first and len(calls) == 1
    assert [p.name for p in root.iterdir()] == [first.name]  # no leftovers

    gguf.write_bytes(b"GGUF another version")  # a new file gets a new folder
    assert default_model_dir(root) != first and len(calls) == 2


def test_cache_dir_from_env(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("GATT_CACHE_DIR", str(tmp_path / "from-env"))
    assert default_model_dir().parent == tmp_path / "from-env"
    monkeypatch.delenv("GATT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir().parent == tmp_path / "home" / ".cache" / "gatt"


def test_crash_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    root = tmp_path / "cache"

    def crash(model, tokenizer, out):
        save_tiny(out, tokenizer)  # half the work done, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(m, "convert", crash)
    with pytest.raises(OSError):
        default_model_dir(root)
    assert list(root.iterdir()) == []


def test_killed_build_is_ignored_and_swept(tmp_path, fake_gguf):
    root = tmp_path / "cache"
    root.mkdir()
    stale = root / ".partial-123-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    old = 1_000_000_000
    os.utime(stale, (old, old))
    final = default_model_dir(root)
    assert (final / m.CACHE_MANIFEST).is_file()
    assert not stale.exists()


def test_racing_builders_agree(tmp_path, fake_gguf, monkeypatch):
    root = tmp_path / "cache"
    barrier = threading.Barrier(2)
    load = m.load_gguf

    def slow_load(path):
        barrier.wait(timeout=30)  # both builders are past the "is it cached?" check
        return load(path)

    monkeypatch.setattr(m, "load_gguf", slow_load)
    results, errors = [], []

    def build():
        try:
            results.append(default_model_dir(root))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert [p.name for p in root.iterdir()] == [results[0].name]
    assert (results[0] / m.CACHE_MANIFEST).is_file()


def test_conversion_checks_the_copy(tmp_path, fake_gguf, monkeypatch):
    # A copy that generates differently (here: a broken lm_head) must never be published.
    real_verify = m._verify_copy

    def tamper(gguf_model, gguf_tokenizer, out):
        model = m._causal_lm(out, torch.float32)
        model.lm_head.weight.data.mul_(-1)
        model.save_pretrained(out)
        return real_verify(gguf_model, gguf_tokenizer, out)

    monkeypatch.setattr(m, "_verify_copy", tamper)
    with pytest.raises(ModelError) as e:
        default_model_dir(tmp_path / "cache")
    assert code_of(e) == "conversion_failed"
    assert list((tmp_path / "cache").iterdir()) == []


def test_default_model_missing(monkeypatch):
    monkeypatch.setattr(m, "GGUF_PACKAGE", "no_such_package_gatt")
    with pytest.raises(ModelError) as e:
        m.embedded_gguf()
    assert code_of(e) == "default_model_missing"


# ---------------------------------------------------------------------------------------------
# The real embedded SmolLM2 (slow: the first dequantization takes ~30 s, once per session)


@pytest.fixture(scope="session")
def smol(cache_root):
    """Build the session cache, keeping the GGUF-loaded model and tokenizer that the build read."""
    seen = []
    load = m.load_gguf

    def spy(path):
        seen.append(load(path))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setattr(m, "load_gguf", spy)
        directory = default_model_dir(cache_root)
    assert len(seen) == 1, "the session cache was already built"
    gguf_model, gguf_tokenizer = seen[0]
    return directory, gguf_model, gguf_tokenizer


@pytest.mark.slow
def test_default_cache_layout(smol, cache_root, monkeypatch):
    directory, _, _ = smol
    assert directory.parent == cache_root
    assert (directory / "model.safetensors").is_file()
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    # The second time nothing is dequantized: reading GGUF now would fail.
    monkeypatch.setattr(m, "load_gguf", lambda path: pytest.fail("GGUF read again"))
    assert default_model_dir() == directory
    loaded = load_model("default", device="cpu")
    assert loaded.base_dir == directory and loaded.source == "default"
    assert loaded.dtype == torch.float32 and not loaded.model.training


@pytest.mark.slow
def test_default_generates_like_gguf(smol):
    _, gguf_model, gguf_tokenizer = smol
    loaded = load_model("default", device="cpu", dtype="float32")
    model = loaded.model
    # Tied: one tensor serves as embeddings and lm_head, equal to the GGUF model's.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, gguf_model.lm_head.weight)
    # A prompt other than the build's own probe; forward passes kept few (CI has two cores).
    ids = prompt_ids(gguf_tokenizer, SHORT)[0].tolist()
    assert m.greedy(model, ids, 6) == m.greedy(gguf_model, ids, 6)
    ids = prompt_ids(gguf_tokenizer)
    assert torch.equal(logits(model, ids), logits(gguf_model, ids))


@pytest.mark.slow
def test_default_tokenizer_preserved(smol):
    directory, _, gguf_tokenizer = smol
    tokenizer = m._tokenizer(directory)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    for generation_prompt in (True, False):
        texts = [
            t.apply_chat_template(DIALOGUE, tokenize=False, add_generation_prompt=generation_prompt)
            for t in (tokenizer, gguf_tokenizer)
        ]
        assert texts[0] == texts[1]
        assert tokenizer(texts[0])["input_ids"] == gguf_tokenizer(texts[1])["input_ids"]
    assert len(tokenizer) == len(gguf_tokenizer)
    assert tokenizer.added_tokens_decoder.keys() == gguf_tokenizer.added_tokens_decoder.keys()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == end_of_turn_ids(gguf_tokenizer) == [im_end]


@pytest.mark.slow
def test_default_bfloat16(smol):
    loaded = load_model("default", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_lora_on_default_base(smol, tmp_path):
    directory, _, gguf_tokenizer = smol
    peft_model = _lora(load_model("default", device="cpu").model)
    ckpt = tmp_path / "ckpt"
    peft_model.save_pretrained(ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    (ckpt / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "default"}))
    # "default" needs no allowed root: it is the service's own cache.
    loaded = load_model(str(ckpt), device="cpu", allowed_roots=[tmp_path])
    assert loaded.base_dir == directory
    ids = prompt_ids(gguf_tokenizer, SHORT)
    assert torch.equal(logits(loaded.model, ids), logits(peft_model, ids))
