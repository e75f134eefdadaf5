"""Import and export of preference data as JSONL or CSV.

Import: one record per JSONL line or CSV row. What a record is follows from its fields:

    prompt              {"prompt": "..."}  or chat  {"messages": [{"role": "user", "content": "..."}]}
    demonstration       {"prompt": "...", "completion": "..."}: a prompt with one completion and
                        no item (what SFT trains on)
    prompt+completions  {"prompt": "...", "completions": ["...", {"text": "...", "model_name": "..."}]}
                        with an optional "ranking": [[0], [2, 1]] (indexes into completions, best
                        group first, a group holds ties) which makes it an imported preference.
                        Without a ranking the completions become queue items of the project's K,
                        so their number must be a multiple of K (or, with wait_for_k, the ones
                        left over wait until sampling or a later import makes up an item of K).
    pairwise            {"prompt": "...", "chosen": "...", "rejected": "..."}
    Anthropic HH        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: A", "rejected": "...Assistant: B"}
                        split at the last "\\n\\nAssistant:" inside the common prefix: the prompt is
                        that prefix (marker included), the completions are the rest. A single
                        turn "\\n\\nHuman: X\\n\\nAssistant: A" whose completions both start with a
                        space is the plain prompt X with completions A (the one space dropped):
                        what the hh export writes for a plain prompt.
    rankings export     a row of the "rankings" export: its "ranking" (indexes) is the preference;
                        its bookkeeping ("groups" of ids, "labeler", "ranking_id", ...) is dropped.

Conversations (rlhf.conversations: roles system/user/assistant, a system turn first only, user
and assistant alternating from the user, no empty turn, a prompt ending with the user) stand
wherever a prompt does, in TRL's conversational formats: "prompt" or "messages" as turns, and
each completion ("completion", "completions" entries, "chosen", "rejected") as a list of one
assistant message; {"chosen": turns, "rejected": turns} shares its prompt turns implicitly;
{"messages": turns ending with the assistant} is a demonstration of that last turn. A
multi-turn HH dialogue becomes a conversation when its turns make one (hh_turns).

A record's completions are all different texts (an item never shows the same text twice), and
"chosen" differs from "rejected". JSON is refused where the database could not store it: NaN
and Infinity, a float beyond its range, an integer longer than Python reads
(sys.get_int_max_str_digits()), nesting deeper than MAX_JSON_DEPTH, NUL characters and unpaired
surrogates anywhere, metadata included. A file over `max_bytes` (the IMPORT_MAX_BYTES setting
for uploads) is refused whole with ImportTooLarge.

"metadata" (an object) and any other field pass through into Prompt.metadata. In CSV, "messages",
"completions", "ranking" and "metadata" cells hold JSON; "completion_1", "completion_2", ... columns
are another way to give completions. Text is stored exactly as read: nothing is stripped or
normalised (CSV line breaks inside quoted cells included).

A file is read twice, both times streaming: the first pass validates every record and stops at
the first bad one with ImportFileError(line, message); the second pass inserts, in batches of
1,000 records (COPY on PostgreSQL, executemany on SQLite, bulk_create elsewhere), inside one
transaction. So a bad line stores nothing, and memory is bounded by the batch, never by the file.

Imported preferences (pairwise, HH, or completions with a ranking) become an Item of source
"import" holding its completions, with one Ranking of source "import" and no user. Prompts with
completions and no ranking become queue items of K completions for the labelers.

Export (streamed JSONL, one JSON object per line, loadable with datasets.load_dataset("json")):

    rankings  one row per ranking (or, with consensus, one Borda-count ranking per item); its
              "prompt" is the text or the conversation's turns
    pairs     {"prompt", "chosen", "rejected"} for every pair of completions in different groups
              of every ranking: C(K,2) pairs minus tied pairs;
              a conversation as TRL's conversational preference (turns, assistant messages)
    hh        {"chosen", "rejected"} as full dialogues: "\n\nHuman: prompt\n\nAssistant:
              completion"; exporting an imported HH file gives back its pairs byte for byte
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import IO, Any

from django.db import connections, router, transaction
from django.db.models import Exists, JSONField, OuterRef
from django.utils import timezone

from labeling.models import Completion, Item, ItemCompletion, Project, Prompt, Ranking
from labeling.selectors import item_completion_texts, rankings_for_project
from rlhf.conversations import ConversationError, conversation_check, conversation_text
from rlhf.rankings import (
    MAX_K,
    MIN_K,
    RankingError,
    ids_to_indices,
    indices_to_ids,
    k_in_range,
    ranking_check,
    ranking_pairs,
)

HH_MARKER = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
BATCH_RECORDS = 1000
# The longest line an import reads (a record's text is far shorter; see _lines).
MAX_LINE_BYTES = 16 * 1024 * 1024
ANALYZE_AFTER_RECORDS = 5000
FORMATS = ("jsonl", "csv")
EXPORT_KINDS = ("rankings", "pairs", "hh")
# Deepest nesting of the JSON an import stores (metadata, chat turns, generation settings).
MAX_JSON_DEPTH = 64
_KNOWN_FIELDS = {
    "prompt",
    "messages",
    "completion",
    "completions",
    "ranking",
    "chosen",
    "rejected",
    "metadata",
}
# What a row of the "rankings" export says about its ranking besides the preference itself.
_RANKINGS_EXPORT_FIELDS = {
    "ranking_id",
    "item_id",
    "prompt_id",
    "labeler",
    "groups",
    "rationale",
    "seconds_spent",
    "display_order",
    "source",
    "created_at",
    "num_rankings",
}
_CSV_JSON_COLUMNS = {"messages", "completions", "ranking", "metadata"}
_BOM = b"\xef\xbb\xbf"


class ImportFileError(Exception):
    """A record that cannot be imported; `line` is 1-based (the line a CSV record starts on)."""

    def __init__(self, line: int, message: str):
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


def byte_size(n: int) -> str:
    """A byte count for people: "512 MiB", "1.5 GiB", "900 bytes"."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f}".removesuffix(".0") + f" {unit}"
    return f"{n:,} bytes"


class ImportTooLarge(Exception):
    """The file is larger than the import limit; nothing was stored. `size` is None for a
    stream, which is read only up to the limit."""

    def __init__(self, limit: int, size: int | None = None):
        size_text = f"{byte_size(size)}, " if size is not None else ""
        super().__init__(
            f"the file is {size_text}over the import limit of {byte_size(limit)} "
            "(IMPORT_MAX_BYTES); split it into smaller files"
        )
        self.size = size
        self.limit = limit


@dataclass
class ImportReport:
    prompts: int = 0
    completions: int = 0
    items: int = 0
    rankings: int = 0
    records: int = 0
    fmt: str = ""

    def as_dict(self) -> dict:
        return {
            "format": self.fmt,
            "records": self.records,
            "prompts": self.prompts,
            "completions": self.completions,
            "items": self.items,
            "rankings": self.rankings,
        }


@dataclass
class _Completion:
    text: str
    model_name: str = ""
    generation: dict = field(default_factory=dict)


@dataclass
class _Record:
    prompt_text: str
    messages: list | None
    metadata: dict
    completions: list[_Completion]
    ranking: list[list[int]] | None  # indexes into completions; None: no preference given


class _Invalid(ValueError):
    pass


# --------------------------------------------------------------------------- record parsing


def _text(value: Any, name: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"field '{name}' must be a string, not {_json_type(value)}")
    if not allow_empty and value == "":
        raise _Invalid(f"field '{name}' is empty")
    if "\x00" in value:
        raise _Invalid(f"field '{name}' contains a NUL character (\\u0000), which cannot be stored")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(
            f"field '{name}' contains an unpaired surrogate escape (e.g. \\ud800)"
        ) from None
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, _BadNumber):
        return f"the number {value!r}"
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _messages(value: Any, name: str = "messages", *, last: str | None = "user") -> list[dict]:
    """A conversation (rlhf.conversations: roles, alternation, no empty turn), storable."""
    try:
        conversation_check(value, name=name, last=last)
    except ConversationError as exc:
        raise _Invalid(str(exc)) from None
    for i, turn in enumerate(value):
        _check_json(turn, f"{name}[{i}]")
    return value


def _assistant_text(value: Any, name: str) -> str:
    """The text of a conversational completion: a list holding one assistant message (TRL's
    conversational "chosen", "rejected", "completion" and "completions" entries)."""
    if len(value) != 1:
        raise _Invalid(
            f"field '{name}' holds {len(value)} messages: a completion is one assistant message"
        )
    turn = value[0]
    if not isinstance(turn, dict) or "content" not in turn:
        raise _Invalid(f"field '{name}[0]' must be an object with 'role' and 'content'")
    if turn.get("role") != "assistant":
        raise _Invalid(
            f"field '{name}[0].role' is {turn.get('role')!r}: a completion is the assistant's"
        )
    return _text(turn["content"], f"{name}[0].content")


def _completion_text(value: Any, name: str) -> str:
    """A completion given as text or as a one-message conversation."""
    return _assistant_text(value, name) if isinstance(value, list) else _text(value, name)


def _completions(value: Any) -> list[_Completion]:
    if not isinstance(value, list) or not value:
        raise _Invalid("field 'completions' must be a non-empty array")
    out = []
    for i, c in enumerate(value):
        if isinstance(c, (str, list)):
            out.append(_Completion(_completion_text(c, f"completions[{i}]")))
        elif isinstance(c, dict):
            if "text" not in c:
                raise _Invalid(f"completions[{i}] is missing 'text'")
            model_name = c.get("model_name", c.get("model", "")) or ""
            generation = c.get("generation", {}) or {}
            if not isinstance(generation, dict):
                raise _Invalid(f"completions[{i}].generation must be an object")
            _check_json(generation, f"completions[{i}].generation")
            out.append(
                _Completion(
                    _text(c["text"], f"completions[{i}].text"),
                    _text(model_name, f"completions[{i}].model_name")[:500],
                    generation,
                )
            )
        else:
            raise _Invalid(
                f"completions[{i}] must be a string, an object with 'text' or a list of one "
                "assistant message"
            )
    first: dict[str, int] = {}
    for i, c in enumerate(out):
        if c.text in first:
            raise _Invalid(
                f"field 'completions[{i}]' is the same text as completions[{first[c.text]}]: "
                "an item never shows the same completion twice"
            )
        first[c.text] = i
    return out


def _ranking(value: Any, n: int) -> list[list[int]]:
    if not k_in_range(n):
        raise _Invalid(f"a ranking needs {MIN_K} to {MAX_K} completions, this record has {n}")
    try:
        return ranking_check(value, range(n))
    except RankingError as exc:
        raise _Invalid(str(exc)) from None


def _same_text(chosen: str, rejected: str) -> None:
    if chosen == rejected:
        raise _Invalid(
            "'chosen' and 'rejected' are the same text: a preference needs two different "
            "completions"
        )


def hh_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two Anthropic HH dialogues into (prompt, chosen completion, rejected completion) at
    the last "\\n\\nAssistant:" inside their common prefix. Concatenation gives the input back."""
    common = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_MARKER, 0, common)
    if cut < 0:
        raise _Invalid(
            "'chosen' and 'rejected' share no '\\n\\nAssistant:' prefix (Anthropic HH format); "
            "give a 'prompt' field for plain pairwise preferences"
        )
    end = cut + len(HH_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_plain(prefix: str, chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a split HH pair: a single human turn
    "\\n\\nHuman: X\\n\\nAssistant:" whose completions both start with a space is the plain
    prompt X and the completions without that space (the inverse of hh_dialogue); any other
    dialogue is kept as it is."""
    human = "\n\nHuman: "
    text = prefix[len(human) : -len(HH_MARKER)]
    if (
        prefix.startswith(human)
        and text
        and "\n\nHuman:" not in text
        and HH_MARKER not in text
        and chosen.startswith(" ")
        and rejected.startswith(" ")
    ):
        return text, chosen[1:], rejected[1:]
    return prefix, chosen, rejected


def hh_turns(prefix: str) -> list[dict] | None:
    """The conversation an HH prompt "[system]\\n\\nHuman: X\\n\\nAssistant: Y ...\\n\\nHuman:
    Z\\n\\nAssistant:" holds (the one space after each marker dropped, text before the first
    "Human:" a system turn), or None when its turns make no conversation (two human turns in a
    row, an empty turn)."""
    parts = _HH_TURN.split(prefix)  # [lead, role, content, role, content, ..., "Assistant", ""]
    lead, rest = parts[0], parts[1:]
    if len(rest) < 4 or rest[-2:] != ["Assistant", ""]:
        return None
    turns = [{"role": "system", "content": lead}] if lead else []
    for marker, content in zip(rest[0:-2:2], rest[1:-2:2], strict=True):
        turns.append(
            {
                "role": "user" if marker == "Human" else "assistant",
                "content": content[1:] if content.startswith(" ") else content,
            }
        )
    try:
        return conversation_check(turns)
    except ConversationError:
        return None


def hh_prefix(messages: list[dict]) -> str:
    """A conversation as the HH prompt that hh_turns reads back (a system turn leads)."""
    lead = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = "".join(
        f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
        for m in messages
        if m["role"] != "system"
    )
    return lead + turns + HH_MARKER


def _hh_record(chosen: str, rejected: str) -> tuple[str, list[dict] | None, str, str]:
    """(prompt text, turns, chosen, rejected) of an HH pair: a single turn is a plain prompt
    (hh_plain); a dialogue whose turns make a conversation is one, its text kept as written
    and the one space after the last "Assistant:" taken off the completions (hh_dialogue puts
    it back); anything else stays the text prompt it is."""
    prompt_text, chosen, rejected = hh_plain(*hh_split(chosen, rejected))
    turns = None
    if prompt_text.endswith(HH_MARKER) and chosen.startswith(" ") and rejected.startswith(" "):
        turns = hh_turns(prompt_text)
        if turns is not None:
            chosen, rejected = chosen[1:], rejected[1:]
    _same_text(chosen, rejected)
    return prompt_text, turns, chosen, rejected


def _conversation_pair(chosen: Any, rejected: Any) -> tuple[list[dict], str, str]:
    """TRL's implicit-prompt preference: two conversations that share every turn but their
    final assistant turn. Returns (prompt turns, chosen text, rejected text)."""
    _messages(chosen, "chosen", last="assistant")
    _messages(rejected, "rejected", last="assistant")
    if chosen[:-1] != rejected[:-1]:
        raise _Invalid(
            "'chosen' and 'rejected' must share every turn but the last: the shared turns are "
            "the prompt, the last assistant turns the completions"
        )
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


_ANSWER_FIELDS = ("completion", "completions", "chosen", "rejected")


def _prompt(obj: dict) -> tuple[str | None, list[dict] | None, _Completion | None]:
    """(prompt text, turns, demonstration) of a record. A prompt is "prompt" text, "prompt"
    as a conversation (TRL's conversational format) or "messages"; "messages" ending with an
    assistant turn, with no other answer, is a demonstration of that turn (TRL's
    conversational language-modeling rows)."""
    raw = obj.get("prompt")
    given = obj.get("messages")
    if isinstance(raw, list):
        if given is not None:
            raise _Invalid("give the conversation once: as 'prompt' or as 'messages'")
        messages = _messages(raw, "prompt")
        return conversation_text(messages), messages, None
    if "prompt" in obj:
        text = _text(raw, "prompt", allow_empty=False)
        return text, (_messages(given) if given is not None else None), None
    if given is None:
        return None, None, None
    answered = any(key in obj for key in _ANSWER_FIELDS)
    messages = _messages(given, last="user" if answered else None)
    if messages[-1]["role"] == "assistant":
        messages, demo = messages[:-1], _Completion(messages[-1]["content"])
        return conversation_text(messages), messages, demo
    return conversation_text(messages), messages, None


def _record(obj: Any, *, k: int, wait_for_k: bool = False) -> _Record:
    """One record from its parsed JSON; `k` is the project's K (see the module docstring)."""
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, found {_json_type(obj)}")
    metadata = obj.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _Invalid(f"field 'metadata' must be an object, not {_json_type(metadata)}")
    _check_json(metadata, "metadata")
    skip = _KNOWN_FIELDS
    if "ranking_id" in obj and "groups" in obj:  # a row of the rankings export
        skip = _KNOWN_FIELDS | _RANKINGS_EXPORT_FIELDS
    extras = {key: value for key, value in obj.items() if key not in skip}
    for key, value in extras.items():
        _field_name(key, "the record")
        _check_json(value, key)
    if extras:
        metadata = {**extras, **metadata}

    prompt_text, messages, demo = _prompt(obj)
    if demo is not None:
        return _Record(prompt_text, messages, metadata, [demo], None)

    has_chosen, has_rejected = "chosen" in obj, "rejected" in obj
    if has_chosen or has_rejected:
        if not (has_chosen and has_rejected):
            raise _Invalid(f"missing field '{'rejected' if has_chosen else 'chosen'}'")
        if "completions" in obj or "ranking" in obj:
            raise _Invalid("give either 'chosen'/'rejected' or 'completions', not both")
        chosen, rejected = obj["chosen"], obj["rejected"]
        if prompt_text is None and isinstance(chosen, list) and isinstance(rejected, list):
            messages, chosen, rejected = _conversation_pair(chosen, rejected)
            prompt_text = conversation_text(messages)
        chosen = _completion_text(chosen, "chosen")
        rejected = _completion_text(rejected, "rejected")
        _same_text(chosen, rejected)
        if prompt_text is None:
            prompt_text, messages, chosen, rejected = _hh_record(chosen, rejected)
        return _Record(
            prompt_text,
            messages,
            metadata,
            [_Completion(chosen), _Completion(rejected)],
            [[0], [1]],
        )

    if prompt_text is None:
        raise _Invalid("missing field 'prompt' (or 'messages', or 'chosen' and 'rejected')")
    if "completion" in obj:
        if "completions" in obj or obj.get("ranking") is not None:
            raise _Invalid("give either 'completion' (a demonstration) or 'completions', not both")
        demo = _Completion(_completion_text(obj["completion"], "completion"))
        return _Record(prompt_text, messages, metadata, [demo], None)
    if "completions" in obj:
        completions = _completions(obj["completions"])
        if obj.get("ranking") is not None:
            ranking = _ranking(obj["ranking"], len(completions))
            return _Record(prompt_text, messages, metadata, completions, ranking)
        n = len(completions)
        if n % k and not wait_for_k:
            raise _Invalid(
                f"field 'completions' holds {n}, which does not make items of K={k} (the "
                f"project's responses per item): give a multiple of {k} completions, a "
                "'ranking', or one 'completion' for a demonstration; or import with wait_for_k "
                f"to keep the {n % k} left over until more completions make up an item"
            )
        return _Record(prompt_text, messages, metadata, completions, None)
    if obj.get("ranking") is not None:
        raise _Invalid("field 'ranking' needs 'completions'")
    return _Record(prompt_text, messages, metadata, [], None)


# --------------------------------------------------------------------------- JSON


class _BadNumber:
    """A number as written in the file that cannot be stored: NaN and Infinity (Python's json
    reads them, PostgreSQL refuses them), a float beyond its range (read as infinity), or an
    integer longer than Python converts (sys.get_int_max_str_digits()). Kept in the parsed
    value so that the error can name its field."""

    def __init__(self, text: str, why: str):
        self.text = text if len(text) <= 24 else f"{text[:12]}...{text[-6:]}"
        self.why = why

    def __repr__(self) -> str:
        return self.text


def _parse_constant(text: str) -> _BadNumber:
    return _BadNumber(text, "JSON has no NaN or Infinity; write null or a string")


def _parse_int(text: str) -> int | _BadNumber:
    try:
        return int(text)
    except ValueError:  # over sys.get_int_max_str_digits() digits
        return _BadNumber(text, f"an integer of {len(text.lstrip('-')):,} digits is too long")


def _parse_float(text: str) -> float | _BadNumber:
    value = float(text)
    if math.isfinite(value):
        return value
    return _BadNumber(text, "the number is beyond the range of a float")


def _loads(text: str) -> Any:
    """json.loads that keeps numbers the database cannot store as _BadNumber (see
    _check_json) and says so when nesting is too deep to parse."""
    try:
        return json.loads(
            text,
            parse_constant=_parse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except RecursionError:
        raise _Invalid(
            f"the JSON is nested too deeply to read (the limit is {MAX_JSON_DEPTH} levels)"
        ) from None


def _field_name(key: str, where: str) -> None:
    try:
        _text(key, "")
    except _Invalid as exc:
        what = "a NUL character" if "\x00" in key else "an unpaired surrogate escape"
        raise _Invalid(f"{where} has a field name with {what}, which cannot be stored") from exc


def _check_json(value: Any, name: str, depth: int = 0) -> None:
    """Refuse, naming where it is, what JSON data to be stored as is (metadata, chat turns,
    generation settings) holds that the database cannot store."""
    if depth > MAX_JSON_DEPTH:
        raise _Invalid(f"field '{name}' is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, _BadNumber):
        raise _Invalid(f"field '{name}' is {value!r}: {value.why}")
    if isinstance(value, str):
        _text(value, name)
    elif isinstance(value, dict):
        for key, item in value.items():
            _field_name(key, f"field '{name}'")
            _check_json(item, f"{name}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{name}[{i}]", depth + 1)


# --------------------------------------------------------------------------- readers


def _lines(fileobj: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Physical lines split at b"\\n" only (a "\\r" stays part of its line), numbered from 1.
    A line longer than MAX_LINE_BYTES is an error: read whole, one huge line (a binary file,
    a file without line breaks) would have to fit in the web process's memory."""
    limit = MAX_LINE_BYTES
    for number, raw in enumerate(iter(lambda: fileobj.readline(limit + 1), b""), start=1):
        if len(raw) > limit:
            raise ImportFileError(
                number, f"the line is longer than {limit:,} bytes (is this a JSONL or CSV file?)"
            )
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        yield number, raw


def _decode(number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ImportFileError(
            number, f"not valid UTF-8 (byte {exc.start + 1} of the line)"
        ) from None


def _jsonl_records(fileobj: IO[bytes], parse) -> Iterator[tuple[int, _Record]]:
    for number, raw in _lines(fileobj):
        if not raw.strip():
            continue
        text = _decode(number, raw)
        try:
            # Without its line break, so that the column of an error is on this line.
            obj = _loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as exc:
            raise ImportFileError(
                number, f"invalid JSON: {exc.msg} at column {exc.colno}"
            ) from None
        except _Invalid as exc:
            raise ImportFileError(number, str(exc)) from None
        try:
            yield number, parse(obj)
        except _Invalid as exc:
            raise ImportFileError(number, str(exc)) from None


def _csv_records(fileobj: IO[bytes], parse) -> Iterator[tuple[int, _Record]]:
    current = [0]

    def text_lines() -> Iterator[str]:
        for number, raw in _lines(fileobj):
            current[0] = number
            yield _decode(number, raw)

    csv.field_size_limit(max(csv.field_size_limit(), 64 * 1024 * 1024))
    reader = csv.reader(text_lines(), strict=True)
    header: list[str] = []
    while not header:  # blank lines before the header are skipped
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ImportFileError(current[0], f"bad CSV: {exc}") from None
    header_line = reader.line_num
    if len(set(header)) != len(header):
        raise ImportFileError(header_line, "the CSV header repeats a column name")
    names = set(header)
    completion_columns = sorted(
        (i for i, name in enumerate(header) if _completion_column_number(name) is not None),
        key=lambda i: _completion_column_number(header[i]),
    )
    if not ({"prompt", "messages"} & names or {"chosen", "rejected"} <= names):
        raise ImportFileError(
            header_line,
            "the CSV header needs a 'prompt' or 'messages' column, or 'chosen' and 'rejected' columns",
        )
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise ImportFileError(start, f"bad CSV: {exc}") from None
        if not row:
            continue
        if len(row) != len(header):
            raise ImportFileError(
                start, f"expected {len(header)} fields as in the header, found {len(row)}"
            )
        obj: dict[str, Any] = {}
        try:
            for i, (name, cell) in enumerate(zip(header, row, strict=True)):
                if i in completion_columns:
                    continue
                if name in _CSV_JSON_COLUMNS:
                    if cell == "":
                        continue
                    try:
                        obj[name] = _loads(cell)
                    except json.JSONDecodeError as exc:
                        raise _Invalid(f"column '{name}' is not valid JSON: {exc.msg}") from None
                elif name == "prompt" and cell == "" and "messages" in names:
                    continue
                elif name == "completion" and cell == "":
                    continue  # no demonstration on this row
                else:
                    obj[name] = cell
            extra = [row[i] for i in completion_columns if row[i] != ""]
            if extra:
                if "completions" in obj:
                    raise _Invalid(
                        "give either a 'completions' column or 'completion_N' columns, not both"
                    )
                obj["completions"] = extra
            yield start, parse(obj)
        except _Invalid as exc:
            raise ImportFileError(start, str(exc)) from None


def _completion_column_number(name: str) -> int | None:
    for prefix in ("completion_", "completion"):
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        if rest and rest.isdigit():
            return int(rest)
    return None


def detect_format(fileobj: IO[bytes]) -> str:
    """'jsonl' when the first non-blank character is '{', else 'csv'. Leaves the file at 0."""
    head = fileobj.read(64 * 1024)
    fileobj.seek(0)
    head = head[len(_BOM) :] if head.startswith(_BOM) else head
    stripped = head.lstrip()
    return "jsonl" if stripped.startswith(b"{") else "csv"


def _records(fileobj: IO[bytes], fmt: str, parse) -> Iterator[tuple[int, _Record]]:
    fileobj.seek(0)
    return _jsonl_records(fileobj, parse) if fmt == "jsonl" else _csv_records(fileobj, parse)


# --------------------------------------------------------------------------- import


def _seekable(fileobj: IO[bytes], max_bytes: int | None) -> IO[bytes]:
    """The file itself when it can seek, else a spooled copy (of at most max_bytes + 1 bytes:
    enough to tell that it is too large)."""
    inner = getattr(fileobj, "file", fileobj)  # Django's UploadedFile wraps the real file
    if not isinstance(inner.read(0), bytes):
        raise TypeError("import_file needs a file opened in binary mode ('rb')")
    try:
        if inner.seekable():
            return inner
    except (AttributeError, ValueError):
        pass
    spool = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
    if max_bytes is None:
        shutil.copyfileobj(inner, spool, 1024 * 1024)
    else:
        left = max_bytes + 1
        while left > 0 and (chunk := inner.read(min(left, 1024 * 1024))):
            spool.write(chunk)
            left -= len(chunk)
    spool.seek(0)
    return spool


def queue_item_groups(n: int, k: int) -> list[range]:
    """How n unranked completions of one prompt become queue items: consecutive groups of k,
    the rule of services.items_create_for_prompt (a remainder smaller than k waits for more
    completions; `items_create_for_prompt` picks it up later)."""
    return [range(i, i + k) for i in range(0, n - k + 1, k)]


def import_file(
    *,
    project: Project,
    fileobj: IO[bytes],
    fmt: str | None = None,
    user=None,
    wait_for_k: bool = False,
    max_bytes: int | None = None,
) -> ImportReport:
    """Validate the whole file, then store it in one transaction. Raises ImportFileError on the
    first bad record, and ImportTooLarge on a file over `max_bytes`, before anything is written.

    `fileobj` is a binary file (or a Django UploadedFile); `fmt` None detects the format from
    the content. `wait_for_k` keeps unranked completions that do not fill an item of the
    project's K (they wait for more) instead of refusing their line. `user` is the importer:
    accepted for the callers' audit trail, not stored (the data model has no importer field;
    imported rankings have user=None by design)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS} or None, not {fmt!r}")
    given = getattr(fileobj, "file", fileobj)
    fileobj = _seekable(fileobj, max_bytes)
    if max_bytes is not None:
        size = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(0)
        if size > max_bytes:
            raise ImportTooLarge(max_bytes, size if fileobj is given else None)
    fmt = fmt or detect_format(fileobj)
    parse = partial(_record, k=project.k, wait_for_k=wait_for_k)

    count = 0
    for _number, _rec in _records(fileobj, fmt, parse):
        count += 1
    if count == 0:
        raise ImportFileError(1, "the file holds no records")

    report = ImportReport(fmt=fmt)
    alias = router.db_for_write(Prompt)
    with transaction.atomic(using=alias):
        writer = _writer(alias)
        batch: list[_Record] = []
        for _number, rec in _records(fileobj, fmt, parse):
            batch.append(rec)
            if len(batch) >= BATCH_RECORDS:
                _insert(writer, project, batch, report)
                batch.clear()
                connections[alias].queries_log.clear()  # DEBUG=1 would keep every INSERT
        if batch:
            _insert(writer, project, batch, report)
        if report.records >= ANALYZE_AFTER_RECORDS:
            transaction.on_commit(lambda: _analyze(alias), using=alias)
    return report


def _analyze(alias: str) -> None:
    """Refresh the planner's statistics after a large import. Without it, PostgreSQL plans the
    labelers' next-item query for a near-empty table (a sort over every queued item: 74 ms
    instead of 1 ms at 20,000 items) until autovacuum gets round to it."""
    connection = connections[alias]
    with connection.cursor() as cursor:
        for model in (Prompt, Completion, Item, ItemCompletion, Ranking):
            cursor.execute(f"ANALYZE {connection.ops.quote_name(model._meta.db_table)}")


class _OrmWriter:
    """Inserts rows (tuples of column values) with bulk_create: any database."""

    def __init__(self, alias: str):
        self.alias = alias

    def insert(
        self, model, columns: tuple[str, ...], rows: list[tuple], *, ids: bool = False
    ) -> list[int]:
        objs = [model(**dict(zip(columns, row, strict=True))) for row in rows]
        model.objects.using(self.alias).bulk_create(objs, batch_size=BATCH_RECORDS)
        return [obj.pk for obj in objs] if ids else []


class _RawWriter:
    """What the COPY and executemany writers share: the column list (id first when the
    caller needs new ids, created_at last when the model has it) and each row's values in
    that order, with JSON columns encoded by `encode_json`."""

    def __init__(self, alias: str):
        self.connection = connections[alias]

    def layout(self, model, columns: tuple[str, ...], *, ids: bool):
        fields = {f.attname: f for f in model._meta.concrete_fields}
        json_cols = {i for i, c in enumerate(columns) if isinstance(fields[c], JSONField)}
        has_created = "created_at" in fields
        names = (("id",) if ids else ()) + columns + (("created_at",) if has_created else ())
        quoted = ", ".join(self.connection.ops.quote_name(n) for n in names)
        return self.connection.ops.quote_name(model._meta.db_table), json_cols, has_created, quoted

    def values(self, row, new_id, json_cols, has_created) -> list:
        values = [
            self.encode_json(v) if i in json_cols and v is not None else v
            for i, v in enumerate(row)
        ]
        if new_id is not None:
            values.insert(0, new_id)
        if has_created:
            values.append(self.now)
        return values


class _PostgresCopyWriter(_RawWriter):
    """Inserts rows with COPY ... FROM STDIN: on PostgreSQL about 4x less CPU than bulk_create
    and far fewer Python objects per row. New ids come from the table's sequence first, so
    the rows that refer to them can be written in the same batch."""

    def __init__(self, alias: str):
        from psycopg.types.json import Jsonb

        super().__init__(alias)
        self.encode_json = Jsonb
        self.now = timezone.now()

    def insert(
        self, model, columns: tuple[str, ...], rows: list[tuple], *, ids: bool = False
    ) -> list[int]:
        if not rows:
            return []
        table, json_cols, has_created, names = self.layout(model, columns, ids=ids)
        new_ids: list[int] = []
        with self.connection.cursor() as cursor:
            if ids:
                cursor.execute(
                    "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                    [table, len(rows)],
                )
                new_ids = sorted(r[0] for r in cursor.fetchall())
            with cursor.cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for n, row in enumerate(rows):
                    new_id = new_ids[n] if ids else None
                    copy.write_row(self.values(row, new_id, json_cols, has_created))
        return new_ids


class _SqliteWriter(_RawWriter):
    """Inserts rows with one executemany per table: on SQLite less CPU than bulk_create.
    New ids continue after both the table's largest id and its AUTOINCREMENT counter; that
    is safe because the import's transaction holds SQLite's single write lock (a concurrent
    writer would make the insert fail loudly, never collide silently)."""

    encode_json = staticmethod(json.dumps)

    def __init__(self, alias: str):
        super().__init__(alias)
        self.now = self.connection.ops.adapt_datetimefield_value(timezone.now())

    def insert(
        self, model, columns: tuple[str, ...], rows: list[tuple], *, ids: bool = False
    ) -> list[int]:
        if not rows:
            return []
        table, json_cols, has_created, names = self.layout(model, columns, ids=ids)
        new_ids: list[int] = []
        with self.connection.cursor() as cursor:
            if ids:
                cursor.execute(
                    f"SELECT MAX(COALESCE((SELECT MAX(id) FROM {table}), 0), "
                    "COALESCE((SELECT seq FROM sqlite_sequence WHERE name = %s), 0))",
                    [model._meta.db_table],
                )
                first = cursor.fetchone()[0] + 1
                new_ids = list(range(first, first + len(rows)))
            params = [
                self.values(row, new_ids[n] if ids else None, json_cols, has_created)
                for n, row in enumerate(rows)
            ]
            placeholders = ", ".join(["%s"] * len(params[0]))
            cursor.executemany(f"INSERT INTO {table} ({names}) VALUES ({placeholders})", params)
        return new_ids


def _writer(alias: str):
    vendor = connections[alias].vendor
    if vendor == "postgresql":
        return _PostgresCopyWriter(alias)
    if vendor == "sqlite":
        return _SqliteWriter(alias)
    return _OrmWriter(alias)


def _insert(writer, project: Project, batch: list[_Record], report: ImportReport) -> None:
    prompt_ids = writer.insert(
        Prompt,
        ("project_id", "text", "messages", "metadata"),
        [(project.pk, r.prompt_text, r.messages, r.metadata) for r in batch],
        ids=True,
    )
    completion_ids = writer.insert(
        Completion,
        ("prompt_id", "text", "source", "checkpoint_id", "model_name", "generation"),
        [
            (pid, c.text, Completion.Source.IMPORT, None, c.model_name, c.generation)
            for pid, rec in zip(prompt_ids, batch, strict=True)
            for c in rec.completions
        ],
        ids=True,
    )

    # Items: one imported item per ranked record, queue items of K for unranked completions.
    items: list[tuple] = []
    members: list[list[int]] = []
    ranked: list[tuple[int, list[list[int]]]] = []  # (index into items, groups of completion ids)
    pos = 0
    for pid, rec in zip(prompt_ids, batch, strict=True):
        own = completion_ids[pos : pos + len(rec.completions)]
        pos += len(rec.completions)
        if rec.ranking is not None:
            ranked.append((len(items), indices_to_ids(rec.ranking, own)))
            items.append((project.pk, pid, Item.Source.IMPORT, 0, True))
            members.append(own)
        else:
            for group in queue_item_groups(len(own), project.k):
                items.append((project.pk, pid, Item.Source.QUEUE, 0, False))
                members.append([own[i] for i in group])
    item_ids = writer.insert(
        Item, ("project_id", "prompt_id", "source", "ranking_count", "is_complete"), items, ids=True
    )
    writer.insert(
        ItemCompletion,
        ("item_id", "completion_id", "position"),
        [
            (iid, cid, p)
            for iid, cids in zip(item_ids, members, strict=True)
            for p, cid in enumerate(cids)
        ],
    )
    writer.insert(
        Ranking,
        ("item_id", "user_id", "source", "groups", "rationale", "seconds_spent", "display_order"),
        [
            (item_ids[index], None, Ranking.Source.IMPORT, groups, "", None, [])
            for index, groups in ranked
        ],
    )

    report.records += len(batch)
    report.prompts += len(prompt_ids)
    report.completions += len(completion_ids)
    report.items += len(item_ids)
    report.rankings += len(ranked)


# --------------------------------------------------------------------------- export


def borda_consensus(groups_list: Iterable[list[list[int]]], order: list[int]) -> list[list[int]]:
    """One ranking from several by Borda count: in each ranking a completion scores the number
    of completions placed strictly below it (so tied completions score the same); scores are
    summed and equal totals form a tied group. `order` (the item's completion ids) orders ids
    inside a group."""
    score = dict.fromkeys(order, 0)
    for groups in groups_list:
        below = sum(len(g) for g in groups)
        for group in groups:
            below -= len(group)
            for cid in group:
                score[cid] += below
    out: list[list[int]] = []
    for total in sorted(set(score.values()), reverse=True):
        out.append([cid for cid in order if score[cid] == total])
    return out


# Rows are read in keyset-paginated chunks (id > last id) as plain values, never as model
# instances: about 5x less CPU than the ORM objects, no server-side cursor held open while
# a slow client downloads, and memory bounded by one chunk.
EXPORT_CHUNK = 500


def _ranking_chunks(project: Project) -> Iterator[tuple[list[dict], dict[int, dict[int, str]]]]:
    """(ranking rows, {item id: {completion id: text}}) chunk by chunk, oldest ranking first."""
    qs = rankings_for_project(project=project).values(
        "id",
        "item_id",
        "item__prompt_id",
        "item__prompt__text",
        "item__prompt__messages",
        "item__prompt__metadata",
        "user__username",
        "groups",
        "rationale",
        "seconds_spent",
        "display_order",
        "source",
        "created_at",
    )
    last = 0
    while True:
        rows = list(qs.filter(id__gt=last)[:EXPORT_CHUNK])
        if not rows:
            return
        last = rows[-1]["id"]
        yield rows, item_completion_texts(item_ids={r["item_id"] for r in rows})


def _consensus_chunks(project: Project) -> Iterator[tuple[list[dict], dict[int, dict[int, str]]]]:
    """One row per ranked item with its Borda-count consensus groups, chunk by chunk."""
    qs = (
        Item.objects.filter(project=project)
        .filter(Exists(Ranking.objects.filter(item=OuterRef("pk"))))
        .order_by("id")
        .values("id", "prompt_id", "prompt__text", "prompt__messages", "prompt__metadata")
    )
    last = 0
    while True:
        items = list(qs.filter(id__gt=last)[:EXPORT_CHUNK])
        if not items:
            return
        last = items[-1]["id"]
        texts = item_completion_texts(item_ids=[i["id"] for i in items])
        rankings: dict[int, list[dict]] = {}
        for r in (
            Ranking.objects.filter(item_id__in=[i["id"] for i in items])
            .order_by("id")
            .values("item_id", "groups", "created_at")
        ):
            rankings.setdefault(r["item_id"], []).append(r)
        rows = []
        for item in items:
            ranks = rankings[item["id"]]
            rows.append(
                {
                    "id": None,
                    "item_id": item["id"],
                    "item__prompt_id": item["prompt_id"],
                    "item__prompt__text": item["prompt__text"],
                    "item__prompt__messages": item["prompt__messages"],
                    "item__prompt__metadata": item["prompt__metadata"],
                    "user__username": None,
                    "groups": borda_consensus(
                        (r["groups"] for r in ranks), list(texts[item["id"]])
                    ),
                    "rationale": "",
                    "seconds_spent": None,
                    "display_order": [],
                    "source": "consensus",
                    "created_at": max(r["created_at"] for r in ranks),
                    "num_rankings": len(ranks),
                }
            )
        yield rows, texts


def _export_row(row: dict, texts: dict[int, str]) -> dict:
    """A rankings row: "ranking" gives the preference as indexes into "completions" (what
    import reads back); "groups" gives it as completion ids."""
    out = {
        "ranking_id": row["id"],
        "item_id": row["item_id"],
        "prompt_id": row["item__prompt_id"],
        "prompt": row["item__prompt__messages"] or row["item__prompt__text"],
        "metadata": row["item__prompt__metadata"],
        "completions": [{"id": cid, "text": text} for cid, text in texts.items()],
        "labeler": row["user__username"],
        "ranking": ids_to_indices(row["groups"], list(texts)),
        "groups": row["groups"],
        "rationale": row["rationale"],
        "seconds_spent": row["seconds_spent"],
        "display_order": row["display_order"],
        "source": row["source"],
        "created_at": row["created_at"].isoformat(),
    }
    if "num_rankings" in row:
        out["num_rankings"] = row["num_rankings"]
    return out


def export_rows(
    *, project: Project, kind: str = "rankings", consensus: bool = False
) -> Iterator[dict]:
    """Stream export rows; see the module docstring for the kinds."""
    if kind not in EXPORT_KINDS:
        raise ValueError(f"kind must be one of {EXPORT_KINDS}, not {kind!r}")
    chunks = _consensus_chunks(project) if consensus else _ranking_chunks(project)
    for rows, texts in chunks:
        for row in rows:
            item_texts = texts.get(row["item_id"], {})
            if kind == "rankings":
                yield _export_row(row, item_texts)
                continue
            prompt, messages = row["item__prompt__text"], row["item__prompt__messages"]
            for better, worse in ranking_pairs(row["groups"]):
                if kind == "pairs":
                    yield _pair(prompt, messages, item_texts[better], item_texts[worse])
                else:
                    yield {
                        "chosen": hh_dialogue(prompt, messages, item_texts[better]),
                        "rejected": hh_dialogue(prompt, messages, item_texts[worse]),
                    }


def _pair(prompt: str, messages: list[dict] | None, chosen: str, rejected: str) -> dict:
    """A pairs row: plain text, or TRL's conversational preference (the prompt's turns, and
    each completion as a list of one assistant message)."""
    if not messages:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def hh_dialogue(prompt: str, messages: list[dict] | None, completion: str) -> str:
    """One Anthropic HH dialogue. A conversation is its turns (its HH text as imported, else
    hh_prefix) and the completion after "\\n\\nAssistant: " (the space _hh_record takes off
    on import); a text prompt imported from HH already holds its turns and is kept byte for
    byte; any other prompt becomes one human turn: "\\n\\nHuman: {prompt}\\n\\nAssistant:
    {completion}", always with that one space, which import takes off again (hh_plain)."""
    if messages:
        prefix = prompt if hh_turns(prompt) == messages else hh_prefix(messages)
        return f"{prefix} {completion}"
    if prompt.endswith(HH_MARKER):
        return prompt + completion
    return f"\n\nHuman: {prompt}{HH_MARKER} {completion}"


def export_jsonl(
    *, project: Project, kind: str = "rankings", consensus: bool = False
) -> Iterator[bytes]:
    """Export rows as JSONL byte lines (UTF-8, no ASCII escaping, "\\n" after every row)."""
    for row in export_rows(project=project, kind=kind, consensus=consensus):
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def export_to_file(
    *, project: Project, fileobj: IO[bytes], kind: str = "rankings", consensus: bool = False
) -> int:
    """Write the JSONL export to a binary file; returns the number of rows."""
    rows = 0
    for line in export_jsonl(project=project, kind=kind, consensus=consensus):
        fileobj.write(line)
        rows += 1
    fileobj.flush()
    return rows
