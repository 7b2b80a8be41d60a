"""The job config: one pydantic model, strict types, every problem with its dotted path."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from gatt.errors import ValidationFailed
from workers.engine.config import (
    CONDITIONS,
    SERVER_FIELDS,
    Condition,
    JobConfig,
    JobOptions,
    load_config,
    parse_config,
    parse_options,
)


def problems(raw, parse=parse_config) -> list[tuple[str, str]]:
    with pytest.raises(ValidationFailed) as exc:
        parse(raw)
    return [(p.field, p.code) for p in exc.value.problems]


def test_defaults_round_trip_through_json():
    config = parse_config({})
    assert config == JobConfig()
    assert parse_config(config.to_json()) == config
    assert config.training.betas == (0.9, 0.999) and config.to_json()["training"]["betas"] == [0.9, 0.999]


def test_every_problem_is_reported_with_its_path():
    raw = {
        "sampling": {"k": "four", "topp": 1, "temperature": -1},
        "training": {"method": "qlora", "epochs": 0},
        "seed": True,
    }
    assert sorted(problems(raw)) == [
        ("sampling.k", "invalid_type"),
        ("sampling.temperature", "invalid_value"),
        ("sampling.topp", "unknown_field"),
        ("seed", "invalid_type"),
        ("training.epochs", "invalid_value"),
        ("training.method", "invalid_value"),
    ]


def test_unknown_fields_get_a_hint_at_any_depth():
    for raw, field, hint in (
        ({"sampling": {"topp": 1}}, "sampling.topp", "did you mean 'top_p'?"),
        ({"placement": {"atach": "suffix"}}, "placement.atach", "did you mean 'attach'?"),
        ({"trainning": {}}, "trainning", "did you mean 'training'?"),
    ):
        with pytest.raises(ValidationFailed) as exc:
            parse_config(raw)
        (problem,) = exc.value.problems
        assert (problem.field, problem.code) == (field, "unknown_field") and hint in problem.message


def test_numbers_are_not_strings_or_booleans_but_ints_are_floats():
    assert problems({"sampling": {"k": True}}) == [("sampling.k", "invalid_type")]
    assert problems({"sampling": {"k": 4.0}}) == [("sampling.k", "invalid_type")]
    assert problems({"training": {"learning_rate": "1e-4"}}) == [("training.learning_rate", "invalid_type")]
    assert problems({"evaluation": {"attention": 1}}) == [("evaluation.attention", "invalid_type")]
    assert parse_config({"training": {"epochs": 2}}).training.epochs == 2.0


def test_bounds_name_the_limit():
    with pytest.raises(ValidationFailed) as exc:
        parse_config({"sampling": {"k": 65}, "training": {"lora_dropout": 1}})
    messages = {p.field: p.message for p in exc.value.problems}
    assert messages == {
        "sampling.k": "k must be <= 64, not 65",
        "training.lora_dropout": "lora_dropout must be < 1.0, not 1",
    }


def test_a_section_check_points_at_its_field():
    assert problems({"reward": {"reward_model_weight": 1}}) == [
        ("reward.reward_model_weight", "invalid_value")
    ]
    assert problems({"reward": {"verifier_weight": 0}}) == [("reward", "invalid_value")]
    assert problems({"evaluation": {"conditions": ["once", "once"]}}) == [
        ("evaluation.conditions", "invalid_value")
    ]


def test_a_list_reports_its_bad_item_only():
    # Not also "expected a string, found list" (the other member of "a name or a list of names").
    assert problems({"training": {"lora_targets": ["q_proj", 3]}}) == [
        ("training.lora_targets[1]", "invalid_type")
    ]
    assert problems({"evaluation": {"conditions": ["onc"]}}) == [
        ("evaluation.conditions[0]", "invalid_value")
    ]
    assert parse_config({"training": {"lora_targets": ["q_proj", "v_proj"]}}).training.lora_targets == (
        "q_proj",
        "v_proj",
    )


def test_a_request_may_not_set_what_the_server_decides():
    expected = {"model", "base_model", "lineage", "output_dir", "device", "dtype"}
    assert expected | {"data.corpus", "data.validation", "data.instructions"} == SERVER_FIELDS
    raw = {"output_dir": "/etc", "data": {"corpus": "/etc/passwd", "max_turns": 2}, "model": "x"}
    assert problems({"lineage": {"base_model": "x"}}, parse_options) == [("lineage", "server_field")]
    assert sorted(problems(raw, parse_options)) == [
        ("data.corpus", "server_field"),
        ("model", "server_field"),
        ("output_dir", "server_field"),
    ]
    options = parse_options({"data": {"max_turns": 2}})
    assert isinstance(options, JobOptions) and "output_dir" not in options.to_json()
    assert "corpus" not in options.to_json()["data"]


def test_non_finite_numbers_and_non_mappings_are_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("sampling:\n  temperature: .inf\n")
    with pytest.raises(ValidationFailed) as exc:
        load_config(path)
    assert [p.field for p in exc.value.problems] == ["sampling.temperature"]
    assert problems([1]) == [("config", "invalid_type")]
    assert problems({"sampling": 3}) == [("sampling", "invalid_type")]


def test_the_condition_type_lists_the_evaluation_conditions():
    assert typing.get_args(Condition) == CONDITIONS


def test_the_sampling_backend_is_chosen_per_round_and_refused_where_it_cannot_sample():
    import torch

    from workers.engine.models import LoadedModel
    from workers.engine.vllm import SamplerUnavailable, job_sampler

    # A served model holds the base weights: a later round of full fine-tuning would sample the
    # wrong model; a LoRA round loads the round before's adapter into the server.
    full_rounds = {"sampling": {"backend": "vllm"}, "rounds": {"count": 2}, "training": {"method": "full"}}
    assert problems(full_rounds) == [("sampling.backend", "invalid_value")]
    assert parse_config({**full_rounds, "training": {"method": "lora"}}).rounds.count == 2
    cpu = LoadedModel(None, None, torch.device("cpu"), torch.float32, source="default", base_dir=None)
    url = "http://127.0.0.1:9"  # never asked: these choices are made before any request
    assert job_sampler(parse_config({"sampling": {"backend": "loop"}}), cpu, url, 1) is None
    assert job_sampler(parse_config({}), cpu, url, 1) is None  # auto: the loop on CPU
    assert job_sampler(parse_config({}), cpu, None, 1) is None
    with pytest.raises(SamplerUnavailable, match="GATT_VLLM_URL"):
        job_sampler(parse_config({"sampling": {"backend": "vllm"}}), cpu, None, 1)
    # A parent's full checkpoint is weights of its own (workers/tasks.py says so in the lineage); a
    # parent's LoRA checkpoint is an adapter of the served model, loaded into the server.
    lineage = {"parent_job_id": "j", "base_model": "default", "adapter_base": "job:j@3"}
    continued = {"sampling": {"backend": "vllm"}, "lineage": lineage}
    with pytest.raises(SamplerUnavailable, match="parent job's full checkpoint"):
        job_sampler(parse_config(continued), cpu, url, 1)
    # Round 2 of full fine-tuning: auto takes the loop on any device, vllm refuses.
    full = {"training": {"method": "full"}}
    adapter = Path("/nonexistent/step-000001")
    assert job_sampler(parse_config(full), cpu, url, 2, adapter=adapter) is None
    with pytest.raises(SamplerUnavailable, match="fully fine-tuned"):
        job_sampler(parse_config({**full, "sampling": {"backend": "vllm"}}), cpu, url, 2, adapter=adapter)
    # With a server, vllm asks it for its models first: a dead address fails before any sampling.
    with pytest.raises(SamplerUnavailable, match="cannot be asked"):
        job_sampler(parse_config({"sampling": {"backend": "vllm"}}), cpu, url, 1)
