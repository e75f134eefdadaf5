"""Data rows, JSONL reading, validation and collators.

Rows are plain dicts (the lines of the CLI's JSONL files):

- SFT: ``{"prompt", "completion"}``; the loss is taken on completion tokens only, as in
  InstructGPT's supervised fine-tuning (Ouyang et al. 2022, arXiv:2203.02155, sec. 3.5)
  and the "completion-only" masking of Alpaca / TRL.
- Reward and DPO: ``{"prompt", "completions": [...], "ranking": [[i], [j, k], ...]}`` (groups
  best first; completions in one group are tied) or ``{"prompt", "chosen", "rejected"}``
  (Rafailov et al. 2023, arXiv:2305.18290).
- PPO, GRPO and sampling: ``{"prompt"}``.

Conversations: any row may give its prompt as ``"messages"`` (role/content turns ending with
the user, :mod:`rlhf.conversations`) instead of, or with, the ``"prompt"`` text; an SFT row may
be a whole conversation ending with the assistant, every assistant turn a target. Validation
turns such a prompt into a :class:`ChatPrompt`, the text that carries its turns, so that every
trainer hands it on as a prompt string and the encoders here render it with the tokenizer's own
chat template (``apply_chat_template(messages, add_generation_prompt=True)``), or, for a
tokenizer without one, with :data:`PLAIN_CHAT_TEMPLATE`. Too long a conversation loses whole
earlier turns first (the system turn stays longest), so the latest turn is kept and no template
header is ever cut in half.

Token layout of one SFT example (right padding)::

    input_ids: [p0 p1 p2 c0 c1 eos pad pad]
    labels:    [-100 -100 -100 c0 c1 eos -100 -100]     (loss on completion + eos only)

Prompts are tokenized with the tokenizer's special tokens (e.g. BOS), completions without,
and an EOS token ends every completion so that the model learns to stop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.conversations import ConversationError, conversation_check, conversation_text
from rlhf.errors import DataError
from rlhf.rankings import MIN_K, RankingError, ranking_check

IGNORE_INDEX = -100
"""Label value ignored by the cross-entropy loss (PyTorch's default ignore_index)."""


# ---------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file of objects; DataError names the file and line of a bad line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a JSONL file")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:  # a byte-order mark on the first line is not part of the data
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path} line {lineno}: not UTF-8 text (byte {exc.start + 1} of the line); "
                    "save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}"
                )
            row.setdefault("_line", lineno)
            row.setdefault("_file", str(path))
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def strip_meta(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows without bookkeeping keys (``_line``, ``_file``)."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


# ---------------------------------------------------------------------------- validation


def where(row: dict[str, Any], index: int) -> str:
    """Where a row came from, for an error message: "FILE line N" (read_jsonl), else "row I"."""
    if "_line" not in row:
        return f"row {index}"
    return f"{row['_file']} line {row['_line']}" if "_file" in row else f"line {row['_line']}"


def _require_str(row: dict[str, Any], index: int, key: str, *, allow_empty: bool = False) -> None:
    if key not in row:
        raise DataError(f"{where(row, index)}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(
            f"{where(row, index)}: field {key!r} must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise DataError(f"{where(row, index)}: field {key!r} is empty")


class ChatPrompt(str):
    """A conversation prompt: its plain text (what reward functions and logs see) carrying its
    turns in ``.messages`` (what the encoders render with the chat template)."""

    messages: list[dict]

    def __new__(cls, text: str, messages: list[dict]):
        obj = super().__new__(cls, text)
        obj.messages = messages
        return obj

    def __reduce__(self):
        return ChatPrompt, (str(self), self.messages)


def _conversation(row: dict[str, Any], index: int, key: str, *, last: str | None) -> list[dict]:
    try:
        return conversation_check(row[key], name=key, last=last)
    except ConversationError as exc:
        raise DataError(f"{where(row, index)}: {exc}") from None


def row_prompt(row: dict[str, Any], index: int = 0) -> str:
    """The row's prompt: its "prompt" text, or a ChatPrompt when it has "messages"."""
    if row.get("messages") is None:
        _require_str(row, index, "prompt")
        return row["prompt"]
    messages = _conversation(row, index, "messages", last="user")
    if row.get("prompt") is not None:
        _require_str(row, index, "prompt")
    return ChatPrompt(row.get("prompt") or conversation_text(messages), messages)


def _with_messages(out: dict[str, Any], prompt: str) -> dict[str, Any]:
    """A clean row that names its turns too (so that the data hash covers them)."""
    if isinstance(prompt, ChatPrompt):
        out["messages"] = prompt.messages
    return out


def _sft_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """{"prompt", "completion"} (the prompt text or a conversation) or {"messages"}: a whole
    conversation ending with the assistant."""
    if row.get("messages") is not None and "completion" not in row:
        messages = _conversation(row, index, "messages", last="assistant")
        return {"messages": messages}
    if row.get("messages") is None:
        _require_str(row, index, "prompt", allow_empty=True)
    _require_str(row, index, "completion")
    prompt = row_prompt(row, index) if row.get("messages") is not None else row["prompt"]
    return _with_messages({"prompt": prompt, "completion": row["completion"]}, prompt)


def validate_ranking(ranking: Any, num_completions: int, *, where: str = "row") -> list[list[int]]:
    """Check a ranking (groups best first) ranks each completion index exactly once
    (:func:`rlhf.rankings.ranking_check`; a bare index stands for a group of one) and holds
    a preference: an all-tied ranking has nothing to learn from."""
    if isinstance(ranking, list):
        ranking = [[g] if isinstance(g, int) and not isinstance(g, bool) else g for g in ranking]
    try:
        out = ranking_check(ranking, range(num_completions))
    except RankingError as exc:
        raise DataError(f"{where}: {exc}") from None
    if len(out) < 2:
        raise DataError(
            f"{where}: the ranking has a single group (all tied): nothing to learn from"
        )
    return out


def normalize_preference_row(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """Validate a reward/DPO row; return ``{"prompt", "completions", "ranking"}``.

    ``{"prompt","chosen","rejected"}`` becomes completions [chosen, rejected], ranking [[0],[1]].
    """
    at = where(row, index)
    prompt = row_prompt(row, index)
    if "completions" in row:
        comps = row["completions"]
        if (
            not isinstance(comps, list)
            or len(comps) < MIN_K
            or not all(isinstance(c, str) for c in comps)
        ):
            raise DataError(f"{at}: 'completions' must be a list of at least {MIN_K} strings")
        if "ranking" not in row:
            raise DataError(f"{at}: missing field 'ranking' (groups best first, e.g. [[0], [1]])")
        ranking = validate_ranking(row["ranking"], len(comps), where=at)
        return _with_messages(
            {"prompt": prompt, "completions": list(comps), "ranking": ranking}, prompt
        )
    if "chosen" in row or "rejected" in row:
        _require_str(row, index, "chosen")
        _require_str(row, index, "rejected")
        return _with_messages(
            {
                "prompt": prompt,
                "completions": [row["chosen"], row["rejected"]],
                "ranking": [[0], [1]],
            },
            prompt,
        )
    raise DataError(f"{at}: expected 'completions' + 'ranking' or 'chosen' + 'rejected'")


def validate_rows(kind: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check rows for a run kind; return clean rows (preference rows normalised).

    Raises DataError naming the first bad row (its JSONL line when read with read_jsonl).
    """
    if not isinstance(rows, (list, tuple)) or not rows:
        raise DataError("no data rows")
    out = []
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"row {index}: expected an object, got {type(row).__name__}")
        if kind == "sft":
            out.append(_sft_row(row, index))
        elif kind in ("reward", "dpo"):
            out.append(normalize_preference_row(row, index))
        elif kind in ("ppo", "grpo", "sample"):
            clean = {k: v for k, v in row.items() if not k.startswith("_")}
            clean["prompt"] = row_prompt(row, index)
            out.append(clean)
        else:
            raise DataError(f"unknown run kind {kind!r}")
    return out


# ---------------------------------------------------------------------------- tokens


PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' and eos_token %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nassistant:' }}{% endif %}"
)
"""How a conversation is rendered for a tokenizer without a chat template: the "role: content"
blocks of :func:`rlhf.conversations.conversation_text`, each assistant turn ended by EOS."""


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_conversation(tokenizer, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """A conversation as text: the tokenizer's chat template, else PLAIN_CHAT_TEMPLATE."""
    template = None if _has_template(tokenizer) else PLAIN_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def _tokens(tokenizer, text: str, *, templated: bool, offsets: bool = False):
    # a chat template writes its own special tokens; plain text gets the tokenizer's (BOS)
    return tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=offsets)


def _drop_first_exchange(messages: list[dict]) -> list[dict] | None:
    """The conversation without its earliest user turn and the assistant turn after it (a
    system turn stays), or None when no earlier exchange is left to drop."""
    lead = 1 if messages[0]["role"] == "system" else 0
    rest = messages[lead:]
    if len(rest) <= 2:  # a user turn, or a user turn and its answer: the latest exchange
        return None
    return messages[:lead] + rest[2:]


def encode_chat_prompt(tokenizer, messages: list[dict], *, max_len: int) -> list[int]:
    """Token ids of a conversation with the generation prompt, at most ``max_len`` of them:
    whole earlier exchanges are dropped first, then the system turn, and only then is the
    latest user turn's text cut from its start, so that the template's headers stay whole."""
    templated = _has_template(tokenizer)

    def encode(msgs):
        text = render_conversation(tokenizer, msgs, add_generation_prompt=True)
        return _tokens(tokenizer, text, templated=templated)["input_ids"]

    ids = encode(messages)
    while max_len > 0 and len(ids) > max_len:
        shorter = _drop_first_exchange(messages)
        if shorter is None and messages[0]["role"] == "system" and len(messages) > 1:
            shorter = messages[1:]
        if shorter is None:
            return _cut_latest_turn(encode, messages, max_len)
        messages = shorter
        ids = encode(messages)
    return ids


def _cut_latest_turn(encode, messages: list[dict], max_len: int) -> list[int]:
    """A single user turn too long for ``max_len``: keep the end of its text (re-rendered, so
    the template's headers stay whole)."""
    turn = messages[-1]
    text = turn["content"]
    while text:
        ids = encode([{**turn, "content": text}])
        if len(ids) <= max_len:
            return ids
        text = text[len(ids) - max_len :]  # a token is at least one character
    raise DataError(f"max_len={max_len} leaves no room for the chat template's headers")


def format_prompt(tokenizer, prompt: str, *, chat_template: bool = False) -> str:
    """The prompt text fed to the model: raw, or wrapped by the tokenizer's chat template.
    A ChatPrompt is always rendered as its conversation."""
    if isinstance(prompt, ChatPrompt):
        return render_conversation(tokenizer, prompt.messages, add_generation_prompt=True)
    if not chat_template:
        return prompt
    if not _has_template(tokenizer):
        raise DataError("chat_template=True but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(
    tokenizer, prompt: str, *, max_len: int, chat_template: bool = False
) -> list[int]:
    """Prompt token ids (with the tokenizer's special tokens), keeping the last ``max_len``;
    a ChatPrompt keeps its latest turns whole (:func:`encode_chat_prompt`)."""
    if isinstance(prompt, ChatPrompt):
        return encode_chat_prompt(tokenizer, prompt.messages, max_len=max_len)
    text = format_prompt(tokenizer, prompt, chat_template=chat_template)
    add_special = not chat_template  # a chat template already writes its special tokens
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    return ids[-max_len:] if max_len > 0 else ids


def encode_prompt_completion(
    tokenizer,
    prompt: str,
    completion: str,
    *,
    max_seq_len: int,
    chat_template: bool = False,
    add_eos: bool = True,
) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ eos) and the prompt length.

    Truncation keeps at least one completion token: the prompt is cut from the left to
    ``max_seq_len - 1`` tokens, then the completion from the right.
    """
    p_ids = encode_prompt(
        tokenizer, prompt, max_len=max(1, max_seq_len - 1), chat_template=chat_template
    )
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    ids = (p_ids + c_ids)[:max_seq_len]
    return ids, len(p_ids)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn in it: from
    the end of the generation prompt before the turn to the end of the turn as rendered (its
    end-of-turn token included, the whitespace after it not). DataError when the template does
    not render a conversation as the growing prefix of itself."""
    full = render_conversation(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head = render_conversation(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_conversation(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise DataError(
                "the chat template does not render a conversation as a prefix of its longer "
                "self, so assistant turns cannot be told apart for the loss"
            )
        spans.append((len(head), len(upto.rstrip())))
    return full, spans


def encode_conversation(
    tokenizer, messages: list[dict], *, max_seq_len: int
) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether it is a target: a token of
    an assistant turn (its text and end-of-turn token, not its header). Whole earlier
    exchanges are dropped while it is too long; then the end is cut off."""
    templated = _has_template(tokenizer)
    while True:
        text, spans = assistant_spans(tokenizer, messages)
        enc = _tokens(tokenizer, text, templated=templated, offsets=True)
        ids = enc["input_ids"]
        shorter = _drop_first_exchange(messages)
        if len(ids) <= max_seq_len or shorter is None:
            break
        messages = shorter
    targets = [
        end > start and any(a <= start < b for a, b in spans)
        for start, end in enc["offset_mapping"]
    ]
    return ids[:max_seq_len], targets[:max_seq_len]


def completion_mask(prompt_lens: torch.Tensor, seq_lens: torch.Tensor, T: int) -> torch.Tensor:
    """[B] prompt lengths, [B] sequence lengths -> [B,T] bool, True on completion tokens (right padding)."""
    pos = torch.arange(T, device=prompt_lens.device).unsqueeze(0)  # [1,T]
    return (pos >= prompt_lens.unsqueeze(1)) & (pos < seq_lens.unsqueeze(1))


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad lists of ids to one [B,T] tensor; returns (ids, attention_mask)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        t = torch.as_tensor(list(s), dtype=torch.long)
        if side == "right":
            ids[i, : len(s)] = t
            mask[i, : len(s)] = 1
        else:
            ids[i, T - len(s) :] = t
            mask[i, T - len(s) :] = 1
    return ids, mask


def collate_sft(
    examples: Sequence[tuple[list[int], int | list[bool]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pre-tokenized examples -> input_ids, attention_mask, labels (targets only). An example
    is (ids, prompt_len): every token after the prompt is a target; or (ids, targets): one
    flag per token (a conversation's assistant turns)."""
    input_ids, attention_mask = pad_sequences([ids for ids, _ in examples], pad_id, side="right")
    B, T = input_ids.shape
    mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (ids, target) in enumerate(examples):
        if isinstance(target, int):
            mask[i, target : len(ids)] = True
        else:
            mask[i, : len(target)] = torch.as_tensor(target, dtype=torch.bool)
    labels = torch.where(mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def target_count(example: tuple[list[int], int | list[bool]]) -> int:
    """How many target tokens an SFT example has (0: nothing to learn from)."""
    ids, target = example
    return len(ids) - target if isinstance(target, int) else sum(target)


class SFTCollator:
    """Rows {"prompt","completion"} or {"messages"} -> a right-padded batch whose labels are
    the completion (or every assistant turn of the conversation) only."""

    def __init__(self, tokenizer, *, max_seq_len: int, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.chat_template = chat_template

    def encode(self, row: dict[str, Any]) -> tuple[list[int], int | list[bool]]:
        messages = row.get("messages")
        if messages is not None:
            if messages[-1]["role"] != "assistant":  # a conversation prompt + its completion
                messages = [*messages, {"role": "assistant", "content": row["completion"]}]
            return encode_conversation(self.tokenizer, messages, max_seq_len=self.max_seq_len)
        return encode_prompt_completion(
            self.tokenizer,
            row["prompt"],
            row["completion"],
            max_seq_len=self.max_seq_len,
            chat_template=self.chat_template,
        )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_sft([self.encode(r) for r in rows], self.tokenizer.pad_token_id)


class PromptCollator:
    """Rows {"prompt"} -> a LEFT-padded batch for ``generate`` (input_ids, attention_mask)."""

    def __init__(self, tokenizer, *, max_prompt_len: int, chat_template: bool = False):
        self.tokenizer = tokenizer
        self.max_prompt_len = max_prompt_len
        self.chat_template = chat_template

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = encode_prompts(
            self.tokenizer,
            [r["prompt"] for r in rows],
            max_len=self.max_prompt_len,
            chat_template=self.chat_template,
        )
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def encode_prompts(
    tokenizer, prompts: Sequence[str], *, max_len: int, chat_template: bool = False, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts tokenized as :func:`encode_prompt` does (their last ``max_len`` tokens) and
    LEFT-padded, so generated tokens line up on the right: ``(ids [B,P], mask [B,P])``."""
    seqs = [
        encode_prompt(tokenizer, p, max_len=max_len, chat_template=chat_template) for p in prompts
    ]
    ids, mask = pad_sequences(seqs, tokenizer.pad_token_id, side="left")
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
