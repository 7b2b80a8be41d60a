"""Dialogues and the JSONL corpus they are uploaded in.

A corpus is JSONL, one dialogue per line, in the chat format people already have::

    {"id": "d1", "messages": [{"role": "system", "content": "..."},
                              {"role": "user", "content": "..."},
                              {"role": "assistant", "content": "..."}]}

`id` is optional (a non-empty string, unique within the corpus). An optional system message may
only come first; after it the roles alternate user/assistant starting with user, and a dialogue
may end on either role. Unknown keys are errors so that typos ("mesages", "rol") surface instead
of silently dropping data.

Validation reports every problem it finds, each with its 1-based line and a field path
("messages[2].role", 0-based index), under a stable `code` the service passes on unchanged.
`parse_corpus` is all-or-nothing: it either returns every dialogue or raises one
`ValidationFailed` listing every problem (up to `CorpusLimits.max_problems`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gatt.errors import Problem, ValidationFailed, did_you_mean

ROLES = ("system", "user", "assistant")
_TOP_KEYS = ("id", "messages")
_MESSAGE_KEYS = ("role", "content")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Dialogue:
    """A valid dialogue: the constructor enforces the corpus rules except the size limits."""

    messages: tuple[Message, ...]
    id: str | None = None

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple, so equality and hashing don't depend on it.
        object.__setattr__(self, "messages", tuple(self.messages))
        if not all(isinstance(m, Message) for m in self.messages):
            raise TypeError("Dialogue.messages must hold Message objects; use Dialogue.from_messages")
        problems = _check_dialogue(self.to_json(), limits=None, line=None)
        if problems:
            raise ValidationFailed("dialogue", problems)

    @classmethod
    def from_messages(cls, messages: list[dict[str, Any]], id: str | None = None) -> Dialogue:
        """Build from chat-format dicts, raising `ValidationFailed` with every problem found."""
        obj: dict[str, Any] = {"messages": messages} if id is None else {"id": id, "messages": messages}
        problems = _check_dialogue(obj, limits=None, line=None)
        if problems:
            raise ValidationFailed("dialogue", problems)
        return cls(tuple(Message(m["role"], m["content"]) for m in messages), id)

    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0].role == "system":
            return self.messages[0].content
        return None

    @property
    def turns(self) -> list[tuple[str, str | None]]:
        """(user, assistant) pairs; the last assistant is None when the dialogue ends on a user turn."""
        chat = [m.content for m in self.messages if m.role != "system"]
        # Alternation is guaranteed by the constructor, so even positions are user turns.
        return [(chat[i], chat[i + 1] if i + 1 < len(chat) else None) for i in range(0, len(chat), 2)]

    @property
    def n_turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "user")

    def to_json(self) -> dict[str, Any]:
        """The corpus line for this dialogue (as a JSON-ready dict); `id` is left out when None."""
        out: dict[str, Any] = {} if self.id is None else {"id": self.id}
        out["messages"] = [{"role": m.role, "content": m.content} for m in self.messages]
        return out


def leading_replies(replies: Sequence[str | None]) -> list[str]:
    """The replies before the first missing or blank one: the corpus history a turn can stand on
    (turn k needs the replies to turns 1..k-1)."""
    out: list[str] = []
    for reply in replies:
        if reply is None or not reply.strip():
            break
        out.append(reply)
    return out


@dataclass(frozen=True)
class CorpusLimits:
    """Bounds on an upload, so that one bad file cannot exhaust memory or time."""

    max_line_bytes: int = 1_000_000
    max_turns: int = 64  # user turns per dialogue
    max_content_chars: int = 20_000  # per message, system included
    max_dialogues: int = 100_000
    max_problems: int = 1000  # beyond this only one "too_many_problems" is added

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"CorpusLimits.{name} must be a positive integer, not {value!r}")


DEFAULT_LIMITS = CorpusLimits()


def validate_line(
    raw: bytes, line: int, limits: CorpusLimits = DEFAULT_LIMITS
) -> tuple[Dialogue | None, list[Problem]]:
    """Check one corpus line: the dialogue when it is valid, else None and every problem in it.

    A trailing "\\n" or "\\r\\n" is ignored. Corpus-level checks (duplicate ids, counts) belong to
    `iter_corpus`.
    """
    raw = _as_bytes(raw).removesuffix(b"\n").removesuffix(b"\r")

    # Checked before decoding so an oversized line costs nothing more than its length.
    if len(raw) > limits.max_line_bytes:
        return None, [
            Problem(
                "line_too_long",
                f"expected at most {limits.max_line_bytes} bytes per line, found {len(raw)}",
                line=line,
            )
        ]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        return None, [
            Problem(
                "invalid_utf8", f"expected UTF-8 text, found byte 0x{bad} at byte {e.start + 1}", line=line
            )
        ]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [Problem("invalid_json", f"invalid JSON at column {e.colno}: {e.msg}", line=line)]
    except (ValueError, RecursionError) as e:
        # json.loads raises these beyond its own grammar: very deep nesting, or an integer with more
        # digits than Python will convert.
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        return None, [Problem("invalid_json", f"invalid JSON: {reason}", line=line)]

    problems = _check_dialogue(obj, limits, line)
    if problems:
        return None, problems
    messages = tuple(Message(m["role"], m["content"]) for m in obj["messages"])
    return Dialogue(messages, obj.get("id")), []


def iter_corpus(
    lines: Iterable[bytes], limits: CorpusLimits = DEFAULT_LIMITS
) -> Iterator[tuple[int, Dialogue | None, list[Problem]]]:
    """Validate a corpus line by line, yielding (line number, dialogue or None, problems).

    Blank lines are skipped (but still counted, so line numbers match an editor's). The dialogue
    is None exactly when the problems are not empty; a repeated id is reported on the later line.
    Past `max_dialogues` one "too_many_dialogues" problem is yielded and reading stops. An empty
    corpus is only known at the end, so that check is `parse_corpus`'s.
    """
    first_line_of_id: dict[str, int] = {}
    count = 0
    for number, raw in enumerate(lines, start=1):
        raw = _as_bytes(raw)
        if number == 1:
            # Editors on Windows like to start UTF-8 files with a byte-order mark.
            raw = raw.removeprefix(_BOM)
        if not raw.strip():
            continue
        count += 1
        if count > limits.max_dialogues:
            yield (
                number,
                None,
                [
                    Problem(
                        "too_many_dialogues",
                        f"expected at most {limits.max_dialogues} dialogues, found more (stopped here)",
                        line=number,
                    )
                ],
            )
            return
        dialogue, problems = validate_line(raw, number, limits)
        if dialogue is not None and dialogue.id is not None:
            first = first_line_of_id.setdefault(dialogue.id, number)
            if first != number:
                problems = [
                    Problem(
                        "duplicate_id",
                        f"expected unique ids, found {dialogue.id!r} again (first on line {first})",
                        field="id",
                        line=number,
                    )
                ]
                dialogue = None
        yield number, dialogue, problems


def parse_corpus(data: bytes | Iterable[bytes], limits: CorpusLimits = DEFAULT_LIMITS) -> list[Dialogue]:
    """Every dialogue of a corpus, or `ValidationFailed("corpus", problems)` listing every problem.

    `data` is the whole file or an iterable of lines (a binary file, an upload stream). Reading
    stops once `max_problems` is exceeded, since the rest could not be reported anyway.
    """
    lines = _as_bytes(data).split(b"\n") if isinstance(data, bytes | bytearray | str) else data

    dialogues: list[Dialogue] = []
    problems: list[Problem] = []
    seen_any = False
    for _, dialogue, found in iter_corpus(lines, limits):
        seen_any = True
        if dialogue is not None:
            if not problems:  # all-or-nothing: once anything is wrong, stop holding dialogues
                dialogues.append(dialogue)
            continue
        dialogues.clear()
        room = limits.max_problems - len(problems)
        problems.extend(found[:room])
        if len(found) > room:
            problems.append(
                Problem(
                    "too_many_problems",
                    f"stopped after {limits.max_problems} problems; fix these and upload again",
                )
            )
            break
    if not seen_any:
        problems.append(Problem("empty_corpus", "expected at least one dialogue, found none"))
    if problems:
        raise ValidationFailed("corpus", problems)
    return dialogues


def dump_corpus(dialogues: Iterable[Dialogue]) -> bytes:
    """JSONL (UTF-8, non-ASCII kept as is) that `parse_corpus` reads back to equal dialogues."""
    return b"".join(json.dumps(d.to_json(), ensure_ascii=False).encode("utf-8") + b"\n" for d in dialogues)


def corpus_stats(dialogues: Iterable[Dialogue]) -> dict[str, int]:
    """Counts for a corpus. `estimated_tokens` is characters / 4 (rounded up): a rough English
    estimate for sizing jobs, not what any particular tokenizer will produce."""
    stats = {
        "dialogues": 0,
        "system_prompts": 0,
        "user_turns": 0,
        "assistant_turns": 0,
        "characters": 0,
    }
    for d in dialogues:
        stats["dialogues"] += 1
        for m in d.messages:
            key = {"system": "system_prompts", "user": "user_turns", "assistant": "assistant_turns"}[m.role]
            stats[key] += 1
            stats["characters"] += len(m.content)
    stats["estimated_tokens"] = (stats["characters"] + 3) // 4
    return stats


# --- the checks ---------------------------------------------------------------------------------


def _check_dialogue(obj: Any, limits: CorpusLimits | None, line: int | None) -> list[Problem]:
    """Every problem in one decoded corpus line; size limits are skipped when `limits` is None."""

    def problem(code: str, message: str, field: str = "") -> None:
        problems.append(Problem(code, message, field, line))

    problems: list[Problem] = []
    if not isinstance(obj, dict):
        problem("not_an_object", f"expected a JSON object with 'messages', found {_kind(obj)}")
        return problems

    for key in obj:
        if key not in _TOP_KEYS:
            problem(
                "unknown_field",
                f"expected only {_names(_TOP_KEYS)}, found {key!r}{did_you_mean(key, _TOP_KEYS)}",
                key,
            )
    if "id" in obj:
        id_ = obj["id"]
        if not isinstance(id_, str) or not id_.strip():
            problem("invalid_type", f"expected a non-empty string, found {_kind(id_)}", "id")
        elif _has_surrogate(id_):
            problem("invalid_utf8", "expected valid Unicode, found an unpaired surrogate escape", "id")
    if "messages" not in obj:
        problem("missing_field", "expected a 'messages' list, found no such field", "messages")
        return problems
    items = obj["messages"]
    if not isinstance(items, list):
        problem("invalid_type", f"expected a list of messages, found {_kind(items)}", "messages")
        return problems
    if limits is not None and len(items) > 2 * limits.max_turns + 1:  # a system message, then turns
        # Checked before the messages: a line of 300,000 `{}` would otherwise cost a problem each.
        most = 2 * limits.max_turns + 1
        problem(
            "too_many_messages",
            f"expected at most {most} messages ({limits.max_turns} user turns), found {len(items)}",
            "messages",
        )
        return problems

    # One entry per message: its role, or None when it is unusable, in which case the order check
    # assumes the expected role so that one typo is not followed by a cascade of order errors.
    roles: list[str | None] = []
    for i, item in enumerate(items):
        at = f"messages[{i}]"
        if not isinstance(item, dict):
            problem("invalid_type", f"expected a message object, found {_kind(item)}", at)
            roles.append(None)
            continue
        for key in item:
            if key not in _MESSAGE_KEYS:
                hint = did_you_mean(key, _MESSAGE_KEYS)
                problem(
                    "unknown_field",
                    f"expected only {_names(_MESSAGE_KEYS)}, found {key!r}{hint}",
                    f"{at}.{key}",
                )

        role = item.get("role")
        if "role" not in item:
            problem(
                "missing_role",
                f"expected a role, one of {_names(ROLES)}, found no 'role' field",
                f"{at}.role",
            )
        elif role not in ROLES:
            problem("unknown_role", f"expected one of {_names(ROLES)}, found {_kind(role)}", f"{at}.role")
        roles.append(role if role in ROLES else None)

        if "content" not in item:
            problem("missing_field", "expected a 'content' string, found no such field", f"{at}.content")
            continue
        content = item["content"]
        if not isinstance(content, str):
            problem("content_not_string", f"expected a string, found {_kind(content)}", f"{at}.content")
        elif not content.strip():
            problem("empty_content", f"expected non-blank text, found {content!r}", f"{at}.content")
        elif limits is not None and len(content) > limits.max_content_chars:
            problem(
                "content_too_long",
                f"expected at most {limits.max_content_chars} characters, found {len(content)}",
                f"{at}.content",
            )
        elif _has_surrogate(content):
            problem(
                "invalid_utf8", "expected valid Unicode, found an unpaired surrogate escape", f"{at}.content"
            )

    problems.extend(_order_problems(roles, line))
    if "user" not in roles and None not in roles:
        found = "only " + _names(str(r) for r in roles) if roles else "no messages"
        problem("no_user_turn", f"expected at least one 'user' message, found {found}", "messages")
    n_user = roles.count("user")
    if limits is not None and n_user > limits.max_turns:
        problem(
            "too_many_turns", f"expected at most {limits.max_turns} user turns, found {n_user}", "messages"
        )
    return problems


def _order_problems(roles: list[str | None], line: int | None) -> list[Problem]:
    problems: list[Problem] = []
    previous: str | None = None  # last user/assistant role, as found
    for i, role in enumerate(roles):
        if role == "system" and i == 0:
            continue
        expected = "assistant" if previous == "user" else "user"
        if role is not None and role != expected:
            if previous is None:
                after = " after the system message" if roles and roles[0] == "system" else ""
                message = f"expected role 'user' first{after}, found {role!r}"
            else:
                message = f"expected role {expected!r} after {previous!r}, found {role!r}"
            if role == "system":
                message += " (a system message may only be messages[0])"
            problems.append(Problem("role_order", message, f"messages[{i}].role", line))
        if role != "system":
            # Continue from what was found, so one misplaced message is reported once.
            previous = role if role is not None else expected
    return problems


def _as_bytes(raw: Any) -> bytes:
    if not isinstance(raw, bytes | bytearray):
        raise TypeError(f"a corpus is bytes (open files in binary mode), not {type(raw).__name__}")
    return bytes(raw)


def _kind(value: Any) -> str:
    """A JSON-flavoured description of a found value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_short(value)!r}" if value else "an empty string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _has_surrogate(text: str) -> bool:
    # json.loads accepts escapes like "\ud800" that decode to strings no tokenizer (or UTF-8
    # encoder) can handle; such text would only fail later, far from its line.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
