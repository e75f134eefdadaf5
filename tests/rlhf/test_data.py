import json

import pytest
import torch

from rlhf.data import (
    IGNORE_INDEX,
    PromptCollator,
    SFTCollator,
    collate_sft,
    completion_mask,
    encode_prompt_completion,
    pad_sequences,
    read_jsonl,
    strip_meta,
    validate_ranking,
    validate_rows,
)
from rlhf.errors import DataError
from rlhf.modeling import load_tokenizer


def test_read_jsonl_names_the_line_of_invalid_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"d.jsonl line 3: invalid JSON"):
        read_jsonl(path)


def test_read_jsonl_rejects_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        read_jsonl(path)


def test_validation_errors_name_the_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n"
    )
    rows = read_jsonl(path)
    assert strip_meta(rows)[0] == {"prompt": "a", "completion": "b"}
    with pytest.raises(DataError, match="line 2: missing field 'completion'"):
        validate_rows("sft", rows)


def test_it_rejects_a_ranking_with_a_missing_completion():
    with pytest.raises(
        DataError,
        match=r"leaves out completion\(s\) 2: a ranking must rank each completion exactly once",
    ):
        validate_ranking([[0], [1]], 3)
    with pytest.raises(DataError, match=r"completion\(s\) 0 appear more than once"):
        validate_ranking([[0], [0, 1]], 2)
    with pytest.raises(DataError, match="holds 5, which is not one of the completion indexes"):
        validate_ranking([[0], [5]], 2)
    with pytest.raises(DataError, match="single group"):
        validate_ranking([[0, 1]], 2)
    assert validate_ranking([[1], [0, 2]], 3) == [[1], [0, 2]]


def test_chosen_rejected_rows_become_a_two_way_ranking():
    rows = validate_rows("dpo", [{"prompt": "p", "chosen": "good", "rejected": "bad"}])
    assert rows == [{"prompt": "p", "completions": ["good", "bad"], "ranking": [[0], [1]]}]


def test_completion_mask_marks_only_completion_tokens():
    mask = completion_mask(torch.tensor([2, 1]), torch.tensor([4, 3]), 5)
    assert mask.tolist() == [
        [False, False, True, True, False],
        [False, True, True, False, False],
    ]


def test_collate_sft_masks_prompt_and_padding_labels():
    batch = collate_sft([([5, 6, 7, 8], 2), ([9, 10, 11], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    X = IGNORE_INDEX
    assert batch["labels"].tolist() == [[X, X, 7, 8], [X, 10, 11, X]]


def test_pad_sequences_left_pads_for_generation():
    ids, mask = pad_sequences([[1, 2, 3], [4]], 0, side="left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_encoding_ends_the_completion_with_eos_and_truncates_keeping_a_completion_token(
    tiny_model_dir,
):
    tok = load_tokenizer(tiny_model_dir)
    ids, p_len = encode_prompt_completion(tok, "Say hello.", " Hello", max_seq_len=64)
    assert ids[-1] == tok.eos_token_id
    assert ids[:p_len] == tok("Say hello.")["input_ids"]
    long_prompt = "word " * 100
    ids, p_len = encode_prompt_completion(tok, long_prompt, " Hello there", max_seq_len=16)
    assert len(ids) == 16 and p_len == 15


def test_collators_share_the_prompt_tokens(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = [
        {"prompt": "Name a fruit.", "completion": " An apple."},
        {"prompt": "Hi", "completion": " yo"},
    ]
    sft = SFTCollator(tok, max_seq_len=32)(rows)
    gen = PromptCollator(tok, max_prompt_len=32)(rows)
    n = len(tok("Hi")["input_ids"])
    assert gen["input_ids"][1, -n:].tolist() == sft["input_ids"][1, :n].tolist()
    assert gen["attention_mask"][1].tolist()[-n - 1 :] == [0] + [1] * n
    assert (sft["labels"][0] != IGNORE_INDEX).sum() == len(
        tok(" An apple.", add_special_tokens=False)["input_ids"]
    ) + 1


def test_chat_template_wraps_the_prompt(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    ids, p_len = encode_prompt_completion(tok, "Hi", " yo", max_seq_len=64, chat_template=True)
    text = tok.decode(ids[:p_len])
    assert text == "<|user|>\nHi<|eos|>\n<|assistant|>\n"
