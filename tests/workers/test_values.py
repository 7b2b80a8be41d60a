"""Instruction values listed by the chat model itself (workers/engine/values.py).

The parsing is a pure function and is tested on messy replies. `apply_model_values` and the job
wiring run against canned replies (the model call, `values._ask`, is replaced). One `slow` test asks
the real embedded SmolLM2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gatt.errors import ValidationFailed
from gatt.instructions import (
    default_instruction_set,
    instruction_set_to_json,
    parse_instruction_set,
    synthesize,
)
from tests.threads import one_torch_thread
from workers.engine import pipeline, values
from workers.engine.config import JobConfig, ValuesConfig, parse_config
from workers.engine.hooks import Hooks
from workers.engine.models import LoadedModel
from workers.engine.values import (
    STOPLIST,
    apply_model_values,
    parse_values,
    prompt_for,
    propose_values,
    values_for_job,
    values_from_report,
)

ROOT = Path(__file__).resolve().parents[2]


def kept(*texts: str, **kwargs) -> list[str]:
    return list(parse_values(list(texts), **kwargs).kept)


def reasons(*texts: str, **kwargs) -> dict[str, str]:
    return dict(parse_values(list(texts), **kwargs).dropped)


# ---------------------------------------------------------------------------------------------
# parse_values: a pure function over messy replies


def test_bullets_and_numbering_are_stripped():
    text = "1. Tennis\n2) Chess\n(3) Golf\n4: Yoga\n- Hiking\n* Pottery\n• Sailing\n+ Baking\n10. Fishing\na) Rowing"
    assert kept(text) == [
        "Tennis",
        "Chess",
        "Golf",
        "Yoga",
        "Hiking",
        "Pottery",
        "Sailing",
        "Baking",
        "Fishing",
        "Rowing",
    ]


def test_nested_markers_markdown_and_quotes():
    text = (
        "1. - Tennis\n"
        "2. **Gardening**\n"
        "- *Cooking*\n"
        "3. `Chess`\n"
        "### Knitting\n"
        '"Stamp collecting"\n'
        "'Bird-watching'.\n"
        "__Surfing__!\n"
    )
    assert kept(text) == [
        "Tennis",
        "Gardening",
        "Cooking",
        "Chess",
        "Knitting",
        "Stamp collecting",
        "Bird-watching",
        "Surfing",
    ]


def test_descriptions_after_the_value_are_cut():
    text = (
        "1. **Gardening**: growing plants and vegetables in your own garden\n"
        "2. Tennis - a racket sport played on a court\n"
        "3. Napoleon Bonaparte (French emperor, 1769-1821)\n"
        "4. Marie Curie — physicist and chemist\n"
        "5. Tennis-playing\n"
    )
    assert kept(text) == ["Gardening", "Tennis", "Napoleon Bonaparte", "Marie Curie", "Tennis-playing"]


def test_several_items_on_one_line_are_split():
    assert kept("1. **Picasso** 2. **Nine Toe Dance** 3) Golf") == ["Picasso", "Nine Toe Dance", "Golf"]
    assert kept("tennis, chess, and golf") == ["tennis", "chess", "golf"]
    assert kept("Reading, writing, or drawing.") == ["Reading", "writing", "drawing"]
    # One comma is not a list: kept whole, and a comma is not part of a name.
    assert reasons("Paris, France") == {"Paris, France": "not_a_name"}


def test_duplicates_are_dropped_case_insensitively_first_spelling_kept():
    result = parse_values(["Tennis\ntennis \nTENNIS\n  Tennis  ", "1. tennis\nChess\nchess"])
    assert result.kept == ("Tennis", "Chess")
    assert [reason for _, reason in result.dropped] == ["duplicate"] * 5
    # Whitespace inside a value does not make it new.
    assert kept("Table  tennis\nTable tennis") == ["Table tennis"]


def test_excluded_values_are_reported_as_already_listed():
    result = parse_values("Chess\nGolf\nTENNIS", exclude=["chess", "Tennis"])
    assert result.kept == ("Golf",)
    assert dict(result.dropped) == {"Chess": "already_listed", "TENNIS": "already_listed"}


def test_long_sentences_and_lead_ins_are_dropped():
    text = (
        "Sure! Here are 20 popular hobbies, one per line:\n"
        "Here are some hobbies\n"
        "I enjoy tennis\n"
        "Playing the guitar on weekends\n"
        "I really like to go out and play football with my friends on sunday afternoons.\n"
        "Outdoor hobbies:\n"
        "Note that these are only examples\n"
        "Hiking\n"
    )
    assert kept(text) == ["Hiking"]
    assert reasons(text) == {
        "Sure! Here are 20 popular hobbies, one per line": "heading",
        "Here are some hobbies": "preamble",
        "I enjoy tennis": "preamble",
        "Playing the guitar on weekends": "too_many_words",
        "I really like to go out and play football with my friends on sunday afternoons": "too_long",
        "Outdoor hobbies": "heading",
        "Note that these are only examples": "too_many_words",
    }


def test_empty_lines_and_bare_markers_are_skipped_silently():
    result = parse_values(["\n\n   \n1.\n- \n**\n\t\nChess\n\n", ""])
    assert result.kept == ("Chess",) and result.dropped == ()
    assert parse_values([]).kept == ()


def test_length_word_count_and_characters():
    too_long = "Abcdefghij Abcdefghij Abcdefghij Abcdefghij"  # 43 characters, 4 words
    assert reasons("a", too_long, "One Two Three Four Five") == {
        "a": "too_short",
        too_long: "too_long",
        "One Two Three Four Five": "too_many_words",
    }
    assert kept("Go", "One Two Three Four", "A" * 40) == ["Go", "One Two Three Four", "A" * 40]
    not_names = ["12345", "C++", "😀 fun", "<|im_end|>", "{value} fans", "x = y", "R2D2 99", "#$%", "N°5"]
    result = parse_values(not_names)
    assert result.kept == () and [reason for _, reason in result.dropped] == ["not_a_name"] * len(not_names)


def test_names_with_accents_and_name_punctuation_are_kept():
    names = ["Frida Kahlo", "Gabriel García Márquez", "Marie Skłodowska-Curie", "J.R.R. Tolkien"]
    names += ["Shaquille O'Neal", "Formula 1 racing", "Arts & crafts", "Jeanne d’Arc"]
    assert kept("\n".join(names)) == names


def test_stoplist_words_are_dropped():
    text = "Hobbies\nNone\netc.\nN/A\nPublic figures\nOthers...\nChess"
    assert kept(text) == ["Chess"]
    assert set(reasons(text).values()) == {"stoplist"}
    assert kept("None\nChess", stoplist=()) == ["None", "Chess"]
    assert {"hobby", "none"} <= STOPLIST


def test_a_kept_value_parses_back_to_itself():
    messy = (
        "1. **Gardening**: plants\n- 'Bird-watching'.\n3) Napoleon Bonaparte (emperor)\ntennis, chess, golf"
    )
    for value in kept(messy):
        assert kept(value) == [value]
    # And parsing is a function of its input alone.
    assert parse_values(messy) == parse_values(messy)


def test_prompt_asks_for_a_bounded_list():
    assert prompt_for("popular hobbies", 30) == "List 20 popular hobbies, one per line, no numbering."
    assert prompt_for("popular hobbies", 7).startswith("List 7 popular hobbies")
    assert values.describe("hobby") == "popular hobbies"
    assert values.describe("board_game") == "examples of board game"


# ---------------------------------------------------------------------------------------------
# apply_model_values against canned replies

HOBBY_REPLIES = [
    "Here are 20 popular hobbies:\n1. Chess\n2. Rock climbing\n3. Calligraphy\n4. Origami",
    "- Origami\n- Beekeeping\n- Kayaking\n- hobby\n- Stamp collecting\n- Juggling",
]
FIGURE_REPLIES = ["1. Napoleon Bonaparte\n2. Ada Lovelace", "Rosa Parks"]
LANGUAGE_REPLIES = ["French\nKlingon\nDutch\nPolish\nTurkish\nSwedish\nElvish"]


@pytest.fixture
def fake_model():
    return LoadedModel(
        model=object(),
        tokenizer=None,
        device=torch.device("cpu"),
        dtype=torch.float32,
        source="default",
        base_dir=Path("."),
    )


@pytest.fixture
def asked(monkeypatch):
    """Replace the model call with canned replies per prompt; record every call."""
    calls: list[dict] = []

    def ask(loaded, prompt, *, seed, samples, max_new_tokens, temperature, top_p):
        calls.append({"prompt": prompt, "seed": seed, "samples": samples, "max_new_tokens": max_new_tokens})
        if "hobbies" in prompt:
            return HOBBY_REPLIES[:samples]
        if "public figures" in prompt:
            return FIGURE_REPLIES[:samples]
        return LANGUAGE_REPLIES

    monkeypatch.setattr(values, "_ask", ask)
    return calls


def _family(instruction_set, name):
    return next(f for f in instruction_set.families if f.name == name)


def test_merge_appends_new_values_and_keeps_the_set_valid(fake_model, asked):
    base = default_instruction_set()
    config = ValuesConfig(enabled=True, samples=2, max_new_tokens=64)
    adjusted, report = apply_model_values(base, fake_model, config, seed=5)

    hobby = report["families"]["hobby"]
    new = [
        "Rock climbing",
        "Calligraphy",
        "Origami",
        "Beekeeping",
        "Kayaking",
        "Stamp collecting",
        "Juggling",
    ]
    assert hobby["used"] == "merged" and hobby["kept"] == new
    assert {"value": "Chess", "reason": "already_listed"} in hobby["dropped"]
    assert {"value": "hobby", "reason": "stoplist"} in hobby["dropped"]
    assert {"value": "Origami", "reason": "duplicate"} in hobby["dropped"]
    assert _family(adjusted, "hobby").values == (*_family(base, "hobby").values, *new)
    assert hobby["prompt"] == "List 20 popular hobbies, one per line, no numbering."
    assert hobby["replies"] == HOBBY_REPLIES
    # Too few public figures survive (Napoleon is already listed): the family keeps its own.
    figure = report["families"]["public_figure"]
    assert figure["used"] == "original" and figure["kept"] == ["Ada Lovelace", "Rosa Parks"]
    assert _family(adjusted, "public_figure") == _family(base, "public_figure")
    assert _family(adjusted, "language") == _family(base, "language")  # not asked about
    assert [c["samples"] for c in asked] == [2, 2] and all(c["max_new_tokens"] == 64 for c in asked)

    assert parse_instruction_set(instruction_set_to_json(adjusted)) == adjusted
    json.dumps(report)  # the report is plain JSON
    drawn = {c.value for i in synthesize(adjusted, 300, seed=1) for c in i.constraints}
    assert drawn & set(new)


def test_replace_uses_only_the_model_values(fake_model, asked):
    config = ValuesConfig(enabled=True, families=("hobby",), mode="replace", min_values=3)
    adjusted, report = apply_model_values(default_instruction_set(), fake_model, config)
    assert report["families"]["hobby"]["used"] == "replaced"
    # In replace mode the family's own values are not excluded: "Chess" is the model's too.
    assert _family(adjusted, "hobby").values[:3] == ("Chess", "Rock climbing", "Calligraphy")
    assert len(_family(adjusted, "hobby").values) == 8


def test_per_family_caps_the_proposals_and_min_values_applies_after_it(fake_model, asked):
    config = ValuesConfig(enabled=True, families=("hobby",), per_family=3, min_values=3)
    adjusted, report = apply_model_values(default_instruction_set(), fake_model, config)
    hobby = report["families"]["hobby"]
    assert hobby["kept"] == ["Rock climbing", "Calligraphy", "Origami"]
    assert [d["value"] for d in hobby["dropped"] if d["reason"] == "over_per_family"] == [
        "Beekeeping",
        "Kayaking",
        "Stamp collecting",
        "Juggling",
    ]
    assert hobby["prompt"].startswith("List 3 popular hobbies")
    config = ValuesConfig(enabled=True, families=("hobby",), per_family=3, min_values=4)
    _, report = apply_model_values(default_instruction_set(), fake_model, config)
    assert report["families"]["hobby"]["used"] == "original"


def test_values_the_family_verifier_rejects_are_dropped(fake_model, asked):
    config = ValuesConfig(enabled=True, families=("language",), min_values=3)
    adjusted, report = apply_model_values(default_instruction_set(), fake_model, config)
    language = report["families"]["language"]
    assert language["kept"] == ["Dutch", "Polish", "Turkish", "Swedish"]
    assert {"value": "Klingon", "reason": "verifier_rejects"} in language["dropped"]
    assert {"value": "Elvish", "reason": "verifier_rejects"} in language["dropped"]
    assert parse_instruction_set(instruction_set_to_json(adjusted)) == adjusted


def test_a_family_missing_from_the_set_is_reported(fake_model, asked):
    config = ValuesConfig(enabled=True, families=("hobby", "board_game"))
    adjusted, report = apply_model_values(default_instruction_set(), fake_model, config)
    assert report["families"]["board_game"] == {"used": "missing", "values": None}
    assert [c["prompt"] for c in asked] == ["List 20 popular hobbies, one per line, no numbering."]
    assert values_from_report(default_instruction_set(), report) == adjusted


def test_seeds_are_per_family_and_reproducible(fake_model, asked):
    config = ValuesConfig(enabled=True)
    first = apply_model_values(default_instruction_set(), fake_model, config, seed=1)
    assert apply_model_values(default_instruction_set(), fake_model, config, seed=1) == first
    apply_model_values(default_instruction_set(), fake_model, config, seed=2)
    seeds = [c["seed"] for c in asked]
    assert seeds[0] != seeds[1]  # hobby and public_figure
    assert seeds[:2] == seeds[2:4] and seeds[4] not in seeds[:2] and seeds[5] not in seeds[:2]
    # Seeded by family name, not position: asking for one family alone gives it the same seed.
    apply_model_values(
        default_instruction_set(), fake_model, ValuesConfig(families=("public_figure",)), seed=1
    )
    assert asked[-1]["seed"] == seeds[1]
    # A job config stands for its values section and its seed.
    _, report = apply_model_values(default_instruction_set(), fake_model, JobConfig(seed=2, values=config))
    assert report["seed"] == 2 and [c["seed"] for c in asked[-2:]] == seeds[4:6]


def test_report_rebuilds_the_same_set_and_is_validated(fake_model, asked):
    config = ValuesConfig(enabled=True, min_values=2)
    adjusted, report = apply_model_values(default_instruction_set(), fake_model, config)
    assert values_from_report(default_instruction_set(), json.loads(json.dumps(report))) == adjusted
    report["families"]["hobby"]["values"] = ["tennis", "Tennis"]  # edited by hand
    with pytest.raises(ValidationFailed):
        values_from_report(default_instruction_set(), report)


def test_propose_values_returns_at_most_n(fake_model, asked):
    assert propose_values(fake_model, "hobby", "popular hobbies", 2, seed=0, samples=2) == [
        "Chess",
        "Rock climbing",
    ]
    with pytest.raises(ValueError):
        propose_values(fake_model, "hobby", "popular hobbies", 0)


# ---------------------------------------------------------------------------------------------
# In a job: config, file, event, rerun


def test_config_section():
    assert JobConfig().values == ValuesConfig() and not JobConfig().values.enabled
    config = parse_config({"values": {"enabled": True, "families": ["hobby"], "mode": "replace"}})
    assert config.values.families == ("hobby",) and config.values.mode == "replace"
    assert json.loads(json.dumps(config.to_json()))["values"]["families"] == ["hobby"]
    assert parse_config(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ValidationFailed) as exc:
        parse_config({"values": {"mode": "mix", "per_family": 0, "colour": 1}})
    fields = {p.field for p in exc.value.problems}
    assert {"values.mode", "values.colour"} <= fields
    with pytest.raises(ValidationFailed) as exc:
        parse_config({"values": {"per_family": 0}})
    assert [p.field for p in exc.value.problems] == ["values.per_family"]
    with pytest.raises(ValidationFailed):
        parse_config({"values": {"families": [""]}})


def test_config_does_not_import_torch():
    code = "import sys, workers.engine.config as c; c.ValuesConfig(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_values_for_job_asks_once_and_reuses_the_file(tmp_path, fake_model, asked):
    events: list[tuple[str, str, dict]] = []
    hooks = Hooks(event=lambda level, kind, message, data: events.append((kind, message, data)))
    job = JobConfig(values=ValuesConfig(enabled=True), seed=4)
    path = tmp_path / values.VALUES_FILE
    first = values_for_job(default_instruction_set(), fake_model, job, path, hooks)
    report = json.loads(path.read_text())
    assert report["seed"] == 4 and report["families"]["hobby"]["used"] == "merged"
    assert events[-1][0] == "values" and events[-1][2]["hobby"] == {
        "used": "merged",
        "kept": 7,
        "dropped": 4,
        "values": 37,
    }
    assert len(asked) == 2
    again = values_for_job(default_instruction_set(), fake_model, job, path, hooks)
    assert again == first and len(asked) == 2  # the model was not asked again
    assert "reused" in events[-1][1]


def test_run_job_loads_the_model_first_and_synthesizes_from_its_values(
    tmp_path, monkeypatch, fake_model, asked
):
    class SamplingReached(Exception):
        pass

    order: list[str] = []

    def load_model(*args, **kwargs):
        order.append("load")
        return fake_model

    def sample_dialogues(*args, **kwargs):
        raise SamplingReached

    monkeypatch.setattr(pipeline, "load_model", load_model)
    monkeypatch.setattr(pipeline, "sample_dialogues", sample_dialogues)
    config = parse_config(
        {
            "output_dir": str(tmp_path / "job"),
            "data": {"corpus": str(ROOT / "examples" / "dialogues.jsonl")},
            "values": {"enabled": True, "families": ["hobby"], "mode": "replace", "min_values": 3},
        }
    )
    events: list[tuple[str, str]] = []
    hooks = Hooks(event=lambda level, kind, message, data: events.append((kind, message)))
    with pytest.raises(SamplingReached):
        pipeline.run_job(config, hooks)
    assert order == ["load"]  # loaded once, before synthesis
    out = tmp_path / "job"
    report = json.loads((out / "instruction_values.json").read_text())
    model_values = set(report["families"]["hobby"]["values"])
    instructions = [json.loads(line) for line in (out / "instructions.jsonl").read_text().splitlines()]
    hobbies = [c["value"] for i in instructions for c in i["constraints"] if c["family"] == "hobby"]
    assert hobbies and set(hobbies) <= model_values
    kinds = [kind for kind, _ in events]
    assert kinds.index("values") < events.index(("stage", "sample"))

    # A rerun reuses the file: the model is not asked again, and the instructions are the same.
    asked.clear()
    with pytest.raises(SamplingReached):
        pipeline.run_job(config, hooks, loaded=fake_model)
    assert asked == []
    assert [
        json.loads(line) for line in (out / "instructions.jsonl").read_text().splitlines()
    ] == instructions


# ---------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_real_model_proposes_hobbies():
    from workers.engine.models import load_model

    with one_torch_thread():
        loaded = load_model("default")
        settings = {"seed": 3, "samples": 2, "max_new_tokens": 64}
        proposed = propose_values(loaded, "hobby", "popular hobbies", 12, **settings)
        assert proposed and len(proposed) <= 12
        assert all(isinstance(v, str) and v and kept(v) == [v] for v in proposed)
        assert propose_values(loaded, "hobby", "popular hobbies", 12, **settings) == proposed

        config = ValuesConfig(
            enabled=True, families=("hobby",), per_family=12, min_values=1, samples=2, max_new_tokens=64
        )
        adjusted, report = apply_model_values(default_instruction_set(), loaded, config, seed=3)
    hobby = report["families"]["hobby"]
    assert hobby["used"] == "merged" and hobby["kept"]
    # Merge mode leaves out the family's own values; every other proposal passes the topic verifier.
    original = {v.casefold() for v in default_instruction_set().families[0].values}
    assert hobby["kept"] == hobby["proposed"][:12] and not original & {v.casefold() for v in hobby["kept"]}
    parsed = parse_instruction_set(instruction_set_to_json(adjusted))
    assert parsed == adjusted
    drawn = {c.value for i in synthesize(adjusted, 400, seed=0) for c in i.constraints}
    assert drawn & set(hobby["kept"])
