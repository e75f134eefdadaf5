"""Conversations in the engine's data (rlhf.data): chat-template rendering, truncation that
keeps the latest turn and whole headers, and SFT labels on every assistant turn only."""

import pytest

from rlhf.data import (
    IGNORE_INDEX,
    ChatPrompt,
    SFTCollator,
    encode_conversation,
    encode_prompt,
    validate_rows,
)
from rlhf.errors import DataError
from rlhf.modeling import load_tokenizer

# ChatML: its markers are plain text to the tiny tokenizer, so each header is several tokens.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "It is four."},
]


def template_ids(tok, messages):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture
def chatml(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = CHATML
    return tok


def runs(ids, targets):
    """The target tokens as contiguous runs of ids."""
    out, run = [], []
    for i, t in zip(ids, targets, strict=True):
        if t:
            run.append(i)
        elif run:
            out, run = [*out, run], []
    return out + ([run] if run else [])


def test_sft_labels_every_assistant_turn_and_nothing_else(chatml):
    ids, targets = encode_conversation(chatml, CHAT, max_seq_len=512)
    text = chatml.apply_chat_template(CHAT, tokenize=False)
    assert chatml.decode(ids) == text
    assert [chatml.decode(r) for r in runs(ids, targets)] == [
        "Paris.<|im_end|>",
        "It is four.<|im_end|>",
    ]
    batch = SFTCollator(chatml, max_seq_len=512)([{"messages": CHAT}])
    labels = batch["labels"][0].tolist()
    assert [lab != IGNORE_INDEX for lab in labels] == targets  # token by token
    assert [lab for lab in labels if lab != IGNORE_INDEX] == [
        i for i, t in zip(ids, targets, strict=True) if t
    ]


def test_a_conversation_prompt_with_a_completion_labels_the_completion_turn(chatml):
    row = {"messages": CHAT[:4], "completion": "Four."}
    (clean,) = validate_rows("sft", [row])
    ids, targets = SFTCollator(chatml, max_seq_len=512).encode(clean)
    assert [chatml.decode(r) for r in runs(ids, targets)] == ["Paris.<|im_end|>", "Four.<|im_end|>"]


def test_without_a_template_the_plain_rendering_labels_assistant_text_and_eos(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    tok.chat_template = None
    ids, targets = encode_conversation(tok, CHAT[1:], max_seq_len=512)
    assert tok.decode(ids) == (
        "user: What is the capital of France?\n\nassistant: Paris.<|eos|>\n\n"
        "user: And two plus two?\n\nassistant: It is four.<|eos|>"
    )
    assert [tok.decode(r) for r in runs(ids, targets)] == [" Paris.<|eos|>", " It is four.<|eos|>"]


def test_a_conversation_prompt_is_rendered_with_the_generation_prompt(chatml):
    prompt = ChatPrompt("text", CHAT[:4])
    expected = template_ids(chatml, CHAT[:4])
    assert encode_prompt(chatml, prompt, max_len=512) == expected
    assert chatml.decode(expected).endswith("<|im_start|>assistant\n")


def test_truncation_drops_whole_earlier_turns_and_keeps_the_latest(chatml):
    long = [CHAT[0]]
    for i in range(6):
        long += [
            {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    long.append({"role": "user", "content": "The latest question?"})
    full = len(template_ids(chatml, long))
    budget = full // 2
    ids = encode_prompt(chatml, ChatPrompt("", long), max_len=budget)
    assert len(ids) <= budget
    # exactly the system turn and the latest whole turns that fit: no header cut in half
    for start in range(1, len(long), 2):
        kept = [long[0], *long[start:]]
        if template_ids(chatml, kept) == ids:
            break
    else:
        pytest.fail(f"not a system turn plus whole latest turns: {chatml.decode(ids)!r}")
    assert kept[-1]["content"] == "The latest question?" and len(kept) < len(long)


def test_one_overlong_user_turn_keeps_its_end_and_whole_headers(chatml):
    turn = {"role": "user", "content": "word " * 200 + "the end?"}
    budget = len(template_ids(chatml, [{"role": "user", "content": "the end?"}])) + 10
    ids = encode_prompt(chatml, ChatPrompt("", [CHAT[0], turn]), max_len=budget)
    text = chatml.decode(ids)
    assert len(ids) <= budget
    assert text.startswith("<|im_start|>user\n") and text.endswith(
        "the end?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_rows_with_messages_become_chat_prompts_and_bad_turns_name_the_field():
    (row,) = validate_rows("ppo", [{"messages": CHAT[:4], "id": 3}])
    assert isinstance(row["prompt"], ChatPrompt) and row["prompt"].messages == CHAT[:4]
    assert row["prompt"] == "system: Be brief.\n\nuser: What is the capital of France?" + (
        "\n\nassistant: Paris.\n\nuser: And two plus two?"
    )
    (pref,) = validate_rows("dpo", [{"messages": CHAT[:2], "chosen": "a", "rejected": "b"}])
    assert pref["prompt"].messages == CHAT[:2] and pref["messages"] == CHAT[:2]
    bad = {"messages": [{"role": "bot", "content": "hi"}], "_line": 4, "_file": "d.jsonl"}
    with pytest.raises(DataError, match=r"d.jsonl line 4: field 'messages\[0\].role' is 'bot'"):
        validate_rows("grpo", [bad])
    with pytest.raises(DataError, match=r"row 0: field 'messages\[2\].role' is 'assistant'"):
        validate_rows("sample", [{"messages": CHAT[:3]}])


def test_a_chat_prompt_survives_pickling():
    import pickle

    prompt = pickle.loads(pickle.dumps(ChatPrompt("t", CHAT[:2])))
    assert prompt == "t" and prompt.messages == CHAT[:2]
