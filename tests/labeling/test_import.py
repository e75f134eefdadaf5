"""Import of prompts, completions and preferences from JSONL and CSV (labeling.importexport)."""

import io
import json
import tracemalloc

import pytest
from django.core.management import CommandError, call_command

from labeling import services
from labeling.importexport import ImportFileError, ImportTooLarge, detect_format, import_file
from labeling.models import Completion, Item, ItemCompletion, Prompt, Ranking
from tests.labeling.chat import CHAT, said

pytestmark = pytest.mark.django_db

# Text that any stripping, newline translation or unicode normalisation would change.
TRICKY = [
    "  leading and trailing spaces  ",
    "windows\r\nline\r\nendings\r\n",
    "a lone \r carriage return and a tab\t",
    "e\u0301 (combining) vs \u00e9 (precomposed), \ufb01 ligature",
    "emoji \U0001f600, RTL \u05e9\u05dc\u05d5\u05dd, NBSP\u00a0, line separator\u2028!",
    "\n\nstarts and ends with blank lines\n\n",
]


def jsonl(*rows, ensure_ascii=False) -> io.BytesIO:
    return io.BytesIO(
        b"".join((json.dumps(r, ensure_ascii=ensure_ascii) + "\n").encode() for r in rows)
    )


def nothing_stored(project) -> bool:
    return not (
        Prompt.objects.filter(project=project).exists()
        or Completion.objects.filter(prompt__project=project).exists()
        or Item.objects.filter(project=project).exists()
        or Ranking.objects.filter(item__project=project).exists()
    )


def item_texts(item) -> list[str]:
    return [
        ic.completion.text
        for ic in ItemCompletion.objects.filter(item=item).select_related("completion")
    ]


# --------------------------------------------------------------------------- formats


def test_it_imports_plain_and_chat_prompts_with_their_metadata(project, admin_user):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    report = import_file(
        project=project,
        fileobj=jsonl(
            {"prompt": "What is 2+2?", "metadata": {"topic": "math"}, "origin": "sheet-3"},
            {"messages": messages},
        ),
        fmt="jsonl",
        user=admin_user,
    )
    assert (report.prompts, report.completions, report.items, report.rankings) == (2, 0, 0, 0)
    plain, chat = Prompt.objects.filter(project=project).order_by("id")
    assert plain.text == "What is 2+2?"
    assert plain.metadata == {"topic": "math", "origin": "sheet-3"}
    assert chat.messages == messages
    assert chat.text == "system: Be brief.\n\nuser: Hi?"


def test_with_wait_for_k_leftover_completions_wait_for_more(project, admin_user, labeler):
    six = [f"answer {i}" for i in range(6)]
    report = import_file(
        project=project,  # K = 4
        fileobj=jsonl(
            {"prompt": "p1", "completions": six},
            {
                "prompt": "p2",
                "completions": [
                    {"text": "x", "model_name": "m-1", "generation": {"t": 1}},
                    "y",
                    "z",
                    "w",
                ],
            },
        ),
        fmt=None,
        user=admin_user,
        wait_for_k=True,
    )
    # p1: one item of 4 (the 2 left over wait for more completions, as items_create_for_prompt does)
    assert (report.prompts, report.completions, report.items, report.rankings) == (2, 10, 2, 0)
    items = list(Item.objects.filter(project=project).order_by("id"))
    assert [i.source for i in items] == [Item.Source.QUEUE, Item.Source.QUEUE]
    assert item_texts(items[0]) == six[:4]
    first = Completion.objects.get(prompt__project=project, text="x")
    assert (first.model_name, first.generation, first.source) == (
        "m-1",
        {"t": 1},
        Completion.Source.IMPORT,
    )
    # The leftovers are picked up by the service once there are K of them.
    p1 = Prompt.objects.get(project=project, text="p1")
    for text in ("answer 6", "answer 7"):
        services.completion_create(prompt=p1, text=text)
    assert len(services.items_create_for_prompt(project=project, prompt=p1)) == 1
    # Queue items are handed out to labelers.
    assert services.assignment_next(project=project, user=labeler).item_id == items[0].pk


def test_it_imports_completions_with_a_ranking_as_an_imported_ranking(project, admin_user):
    import_file(
        project=project,
        fileobj=jsonl({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[2], [0, 1]]}),
        user=admin_user,
    )
    ranking = Ranking.objects.get(item__project=project)
    ids = {c.text: c.pk for c in Completion.objects.filter(prompt__project=project)}
    assert ranking.groups == [[ids["c"]], [ids["a"], ids["b"]]]
    assert (ranking.source, ranking.user_id, ranking.item.source) == ("import", None, "import")


def test_it_imports_pairwise_preferences_as_items_with_an_import_ranking(
    project, admin_user, labeler
):
    report = import_file(
        project=project,
        fileobj=jsonl(
            {
                "prompt": "Capital of France?",
                "chosen": "Paris.",
                "rejected": "Lyon.",
                "metadata": {"id": 7},
            },
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        ),
        user=admin_user,
    )
    assert (report.prompts, report.completions, report.items, report.rankings) == (2, 4, 2, 2)
    ranking = Ranking.objects.filter(item__project=project).order_by("id").first()
    chosen = Completion.objects.get(prompt=ranking.item.prompt, text="Paris.")
    rejected = Completion.objects.get(prompt=ranking.item.prompt, text="Lyon.")
    assert ranking.groups == [[chosen.pk], [rejected.pk]]
    assert ranking.source == Ranking.Source.IMPORT and ranking.user is None
    assert ranking.item.source == Item.Source.IMPORT
    assert ranking.item.prompt.metadata == {"id": 7}
    assert item_texts(ranking.item) == ["Paris.", "Lyon."]
    # Imported preferences are data, not work: no labeler is handed them.
    assert services.assignment_next(project=project, user=labeler) is None


def test_it_splits_anthropic_hh_dialogues_at_the_last_assistant_turn_of_the_common_prefix(
    project, admin_user
):
    prefix = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    row = {"chosen": prefix + " Blue.", "rejected": prefix + " Blue-ish, I guess."}
    import_file(project=project, fileobj=jsonl(row), user=admin_user)
    ranking = Ranking.objects.select_related("item__prompt").get(item__project=project)
    assert ranking.item.prompt.text == prefix  # as written, for the hh export
    assert ranking.item.prompt.messages == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
    ]
    assert item_texts(ranking.item) == ["Blue.", "Blue-ish, I guess."]


def test_an_hh_dialogue_whose_turns_make_no_conversation_stays_a_text_prompt(project, admin_user):
    prefix = "\n\nHuman: Hi\n\nHuman: again?\n\nAssistant:"  # two human turns in a row
    row = {"chosen": prefix + " Yes.", "rejected": prefix + " No."}
    import_file(project=project, fileobj=jsonl(row), user=admin_user)
    prompt = Prompt.objects.get(project=project)
    assert prompt.text == prefix and prompt.messages is None
    assert sorted(prompt.completions.values_list("text", flat=True)) == [" No.", " Yes."]


def test_an_hh_system_text_before_the_first_human_turn_is_a_system_turn(project, admin_user):
    prefix = "Be kind.\n\nHuman: Hi\n\nAssistant:"
    row = {"chosen": prefix + " Hello.", "rejected": prefix + " Go away."}
    import_file(project=project, fileobj=jsonl(row), user=admin_user)
    assert Prompt.objects.get(project=project).messages == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
    ]


def test_it_imports_trl_conversational_preferences_explicit_and_implicit_prompt(
    project, admin_user
):
    rows = [
        {"prompt": CHAT, "chosen": said("Blue."), "rejected": said("Green.")},
        {"chosen": [*CHAT, *said("Blue!")], "rejected": [*CHAT, *said("Red.")]},
    ]
    report = import_file(project=project, fileobj=jsonl(*rows), user=admin_user)
    assert (report.prompts, report.completions, report.items, report.rankings) == (2, 4, 2, 2)
    for ranking, texts in zip(
        Ranking.objects.filter(item__project=project).select_related("item__prompt"),
        (["Blue.", "Green."], ["Blue!", "Red."]),
        strict=True,
    ):
        assert ranking.item.prompt.messages == CHAT
        assert ranking.item.prompt.text.startswith("system: Be brief.\n\nuser: Hi")
        assert item_texts(ranking.item) == texts
        assert ranking.groups[0] == [ranking.item.item_completions.first().completion_id]


def test_it_imports_conversational_completions_and_demonstrations(project, admin_user):
    rows = [
        {"prompt": CHAT, "completions": [said("a"), said("b"), "c", {"text": "d"}]},
        {"prompt": CHAT, "completion": said("Blue.")},
        {"messages": [*CHAT, *said("It is blue.")]},  # TRL's conversational language modeling
    ]
    import_file(project=project, fileobj=jsonl(*rows), user=admin_user)
    queued, demo, full = Prompt.objects.filter(project=project).order_by("id")
    assert item_texts(queued.items.get()) == ["a", "b", "c", "d"]
    assert demo.messages == CHAT and list(demo.completions.values_list("text", flat=True)) == [
        "Blue."
    ]
    assert full.messages == CHAT and not full.items.exists()
    assert list(full.completions.values_list("text", flat=True)) == ["It is blue."]


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            "field 'messages[0].role' is 'bot': a role is one of system, user, assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "  "}]},
            "field 'messages[0].content' is empty",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "field 'messages[1].role' is 'user' where 'assistant' comes next",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "field 'messages[0].role' is 'assistant' where 'user' comes next",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]},
            "field 'messages[1].role' is 'system': only the first turn may be",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}]},
            "field 'messages' holds a system turn and nothing to answer",
        ),
        (
            {"messages": [*CHAT, *said("x")], "completions": ["a", "b", "c", "d"]},
            "field 'messages[4].role' is 'assistant': a prompt ends with a user turn",
        ),
        (
            {"prompt": CHAT[:3], "chosen": said("a"), "rejected": said("b")},
            "field 'prompt[2].role' is 'assistant': a prompt ends with a user turn",
        ),
        ({"prompt": [], "completion": "x"}, "field 'prompt' must be a non-empty array"),
        (
            {"prompt": CHAT, "chosen": said("a") * 2, "rejected": said("b")},
            "field 'chosen' holds 2 messages: a completion is one assistant message",
        ),
        (
            {"prompt": CHAT, "chosen": [{"role": "user", "content": "a"}], "rejected": said("b")},
            "field 'chosen[0].role' is 'user': a completion is the assistant's",
        ),
        (
            {"chosen": [*CHAT, *said("a")], "rejected": [*CHAT[:2], *said("b")]},
            "'chosen' and 'rejected' must share every turn but the last",
        ),
        (
            {"prompt": CHAT, "completions": [said("a"), [{"role": "user", "content": "b"}]]},
            "field 'completions[1][0].role' is 'user'",
        ),
        ({"prompt": CHAT, "messages": CHAT}, "give the conversation once"),
    ],
)
def test_it_refuses_a_malformed_conversation_naming_the_line_and_field(
    project, admin_user, record, words
):
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=jsonl({"prompt": "fine"}, record), user=admin_user)
    assert err.value.line == 2
    assert words in err.value.message
    assert nothing_stored(project)


def test_it_rejects_hh_pairs_without_a_shared_assistant_prefix(project, admin_user):
    rows = [
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: other\n\nAssistant: z"},
    ]
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=jsonl(*rows), user=admin_user)
    assert err.value.line == 2
    assert "Assistant:" in err.value.message
    assert nothing_stored(project)


def test_it_imports_csv_of_each_kind(project, admin_user):
    cases = {
        "prompt,topic\r\nHello?,greeting\r\n": (1, 0, 0, 0),
        'prompt,completion_1,completion_2,completion_3,completion_4\r\nq,a,b,c,"d, with comma"\r\n': (
            1,
            4,
            1,
            0,
        ),
        'prompt,completions,ranking\r\nq,"[""a"",""b""]","[[1],[0]]"\r\n': (1, 2, 1, 1),
        "prompt,chosen,rejected\r\nq,good,bad\r\n": (1, 2, 1, 1),
        'chosen,rejected\r\n"\n\nHuman: hh q\n\nAssistant: yes","\n\nHuman: hh q\n\nAssistant: no"\r\n': (
            1,
            2,
            1,
            1,
        ),
        "prompt,completion\r\nwrite a haiku,old pond\r\nno demo here,\r\n": (2, 1, 0, 0),
        'messages,metadata\r\n"[{""role"": ""user"", ""content"": ""hi""}]","{""k"": 1}"\r\n': (
            1,
            0,
            0,
            0,
        ),
    }
    for text, expected in cases.items():
        report = import_file(
            project=project, fileobj=io.BytesIO(text.encode()), fmt=None, user=admin_user
        )
        assert report.fmt == "csv"
        assert (report.prompts, report.completions, report.items, report.rankings) == expected, text
    assert Prompt.objects.get(project=project, text="Hello?").metadata == {"topic": "greeting"}
    assert Prompt.objects.get(project=project, text="user: hi").metadata == {"k": 1}
    assert Completion.objects.filter(prompt__project=project, text="d, with comma").exists()
    # A single HH turn is a plain prompt (hh_plain), as the hh export writes one.
    hh = Prompt.objects.get(project=project, text="hh q")
    assert sorted(hh.completions.values_list("text", flat=True)) == ["no", "yes"]
    demo = Prompt.objects.get(project=project, text="write a haiku")
    assert list(demo.completions.values_list("text", flat=True)) == ["old pond"]


def test_it_detects_the_format_from_the_content():
    assert detect_format(io.BytesIO(b'\xef\xbb\xbf\n  {"prompt": "x"}\n')) == "jsonl"
    assert detect_format(io.BytesIO(b"prompt\nx\n")) == "csv"


# --------------------------------------------------------------------------- byte-for-byte


@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_it_preserves_jsonl_text_byte_for_byte(project, admin_user, ensure_ascii):
    rows = [{"prompt": t, "chosen": t + "A", "rejected": "B" + t} for t in TRICKY]
    # CRLF line endings between records must not leak into the text either.
    data = jsonl(*rows, ensure_ascii=ensure_ascii).getvalue().replace(b"\n", b"\r\n")
    import_file(project=project, fileobj=io.BytesIO(data), user=admin_user)
    stored = list(
        Ranking.objects.filter(item__project=project).select_related("item__prompt").order_by("id")
    )
    assert [r.item.prompt.text for r in stored] == TRICKY
    assert [item_texts(r.item) for r in stored] == [[t + "A", "B" + t] for t in TRICKY]


def test_it_preserves_csv_text_byte_for_byte_including_line_breaks_in_quoted_cells(
    project, admin_user
):
    buf = io.StringIO(newline="")
    import csv

    writer = csv.writer(buf)  # quotes cells with \r, \n, commas; rows end in \r\n
    writer.writerow(["prompt", "chosen", "rejected"])
    for t in TRICKY:
        writer.writerow([t, t + "A", "B" + t])
    import_file(
        project=project, fileobj=io.BytesIO(buf.getvalue().encode()), fmt="csv", user=admin_user
    )
    stored = list(
        Ranking.objects.filter(item__project=project).select_related("item__prompt").order_by("id")
    )
    assert [r.item.prompt.text for r in stored] == TRICKY
    assert [item_texts(r.item) for r in stored] == [[t + "A", "B" + t] for t in TRICKY]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        (['{"prompt": "ok"}', '{"prompt": "fine"}', '{"prompt": "broken"'], 3, "invalid JSON"),
        (['{"prompt": "ok"}', "", "", '{"completions": ["a", "b"]}'], 4, "missing field 'prompt'"),
        (['{"prompt": "ok", "chosen": "a"}'], 1, "missing field 'rejected'"),
        (['{"prompt": 3}'], 1, "must be a string"),
        (['["prompt"]'], 1, "expected a JSON object"),
        (
            ['{"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [0]]}'],
            1,
            "more than once",
        ),
        (
            ['{"prompt": "p", "completions": ["a", "b"], "ranking": [[0], [5]]}'],
            1,
            "not one of the completion indexes",
        ),
        (['{"prompt": "p", "metadata": [1]}'], 1, "'metadata' must be an object"),
        (['{"prompt": "p"}', '{"prompt": "nul \\u0000 byte"}'], 2, "NUL"),
        (['{"prompt": "p"}', '{"prompt": "half \\ud800 pair"}'], 2, "surrogate"),
        (['{"messages": [{"role": "user"}]}'], 1, "missing 'content'"),
    ],
)
def test_it_reports_a_bad_jsonl_line_by_number_and_stores_nothing(
    project, admin_user, lines, line, words
):
    data = ("\n".join(lines) + "\n").encode()
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(data), fmt="jsonl", user=admin_user)
    assert err.value.line == line
    assert words in err.value.message
    assert str(err.value).startswith(f"line {line}: ")
    assert nothing_stored(project)


def test_a_json_error_points_at_its_column_on_the_bad_line(project, admin_user):
    data = b'{"prompt": "ok"}\n{"prompt": "broken"\n'
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(data), fmt="jsonl", user=admin_user)
    assert err.value.line == 2
    assert "at column 20" in err.value.message  # just after `{"prompt": "broken"`


def test_it_reports_invalid_utf8_with_its_line(project, admin_user):
    data = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(data), user=admin_user)
    assert err.value.line == 2 and "UTF-8" in err.value.message
    assert nothing_stored(project)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        # the second record spans lines 2-3, so the short row is on line 4
        ('prompt,chosen,rejected\nq,"two\nlines",b\nq2,only-two\n', 4, "expected 3 fields"),
        ('prompt,chosen,rejected\nq,a,b\nq,"never closed,b\nmore\n', 3, "bad CSV"),
        ("prompt,completions\nq,not json\n", 2, "not valid JSON"),
        ("prompt,chosen,rejected\nq,a,b\n,a,b\n", 3, "'prompt' is empty"),
        ("title,body\nx,y\n", 1, "header needs"),
    ],
)
def test_it_reports_a_bad_csv_record_by_line_and_stores_nothing(
    project, admin_user, text, line, words
):
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(text.encode()), fmt="csv", user=admin_user)
    assert err.value.line == line, err.value
    assert words in err.value.message
    assert nothing_stored(project)


def test_a_bad_last_line_after_many_batches_stores_nothing(project, admin_user):
    good = "".join(
        json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2500)
    )
    data = (good + '{"prompt": "p", "chosen": "a"}\n').encode()
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(data), user=admin_user)
    assert err.value.line == 2501
    assert nothing_stored(project)


def test_an_empty_file_is_an_error(project, admin_user):
    with pytest.raises(ImportFileError, match="no records"):
        import_file(project=project, fileobj=io.BytesIO(b"\n\n"), user=admin_user)


# --------------------------------------------------------------------------- scale


def test_a_20_mb_import_streams_in_bounded_memory(project, admin_user, tmp_path):
    """20,000 lines of 1 kB: enough to show that memory follows the batch, not the file (the
    100k-line, 200-byte version of this test spent 7 s inserting rows to prove the same)."""
    path = tmp_path / "big.jsonl"
    filler = "x" * 1000
    n = 20_000
    with path.open("wb") as f:
        for i in range(n):
            f.write(b'{"prompt": "prompt %d %s"}\n' % (i, filler.encode()))
    size_mb = path.stat().st_size / 2**20  # about 20 MB
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            report = import_file(project=project, fileobj=f, fmt="jsonl", user=admin_user)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak_mb = peak / 2**20
    assert report.prompts == n
    assert Prompt.objects.filter(project=project).count() == n
    assert (
        Prompt.objects.filter(project=project).order_by("-id").first().text
        == f"prompt {n - 1} {filler}"
    )
    assert peak_mb < 10 < size_mb  # a fraction of the file: no list of all rows, no whole-file read


# --------------------------------------------------------------------------- command


def test_import_data_command_imports_and_reports_bad_lines(project, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    call_command("import_data", str(project.pk), str(good))
    assert "1 prompts, 2 completions, 1 items, 1 rankings" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,chosen,rejected\nq,a,b\nq\n")
    with pytest.raises(CommandError, match=r"bad.csv:3: expected 3 fields"):
        call_command("import_data", str(project.pk), str(bad), "--format", "csv")
    assert Prompt.objects.filter(project=project).count() == 1


def test_a_large_import_refreshes_the_planner_statistics_after_commit(
    project, admin_user, django_capture_on_commit_callbacks
):
    small = b'{"prompt": "p"}\n' * 10
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        import_file(project=project, fileobj=io.BytesIO(small), user=admin_user)
    assert callbacks == []
    big = b"".join(b'{"prompt": "p%d"}\n' % i for i in range(5000))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        import_file(project=project, fileobj=io.BytesIO(big), user=admin_user)
    assert len(callbacks) == 1  # ANALYZE ran (execute=True) without error


def test_a_text_mode_file_is_refused(project, admin_user):
    with pytest.raises(TypeError, match="binary mode"):
        import_file(project=project, fileobj=io.StringIO('{"prompt": "p"}\n'), user=admin_user)


def test_the_orm_fallback_writer_stores_the_same_rows(project, admin_user, monkeypatch):
    from labeling import importexport

    monkeypatch.setattr(importexport, "_writer", importexport._OrmWriter)
    import_file(
        project=project,
        fileobj=jsonl(
            {"prompt": TRICKY[1], "chosen": TRICKY[3], "rejected": TRICKY[4], "metadata": {"m": 1}},
            {"messages": [{"role": "user", "content": "hi"}], "completions": ["a", "b", "c", "d"]},
        ),
        user=admin_user,
    )
    ranking = Ranking.objects.select_related("item__prompt").get(item__project=project)
    assert ranking.item.prompt.text == TRICKY[1] and ranking.item.prompt.metadata == {"m": 1}
    assert item_texts(ranking.item) == [TRICKY[3], TRICKY[4]]
    queued = Item.objects.get(project=project, source=Item.Source.QUEUE)
    assert (
        item_texts(queued) == ["a", "b", "c", "d"] and queued.prompt.messages[0]["content"] == "hi"
    )


def test_imported_ids_are_never_reused_after_a_delete(project, admin_user):
    import_file(
        project=project,
        fileobj=jsonl({"prompt": "p", "chosen": "a", "rejected": "b"}),
        user=admin_user,
    )
    first = Prompt.objects.get(project=project).pk
    top_completion = Completion.objects.order_by("-id").first().pk
    Prompt.objects.filter(pk=first).delete()
    import_file(
        project=project,
        fileobj=jsonl({"prompt": "q", "chosen": "c", "rejected": "d"}),
        user=admin_user,
    )
    second = Prompt.objects.get(project=project)
    assert second.pk > first
    assert min(second.completions.values_list("id", flat=True)) > top_completion


# --------------------------------------------------------------------------- what cannot be stored

DEEP = "[" * 5000 + "]" * 5000
DIGITS = "7" * 5000


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"prompt": "p", "metadata": {"x": ' + DEEP + "}}", "nested too deeply to read"),
        (
            '{"prompt": "p", "metadata": {"x": ' + ("[" * 70 + "]" * 70) + "}}",
            "nested more than 64",
        ),
        ('{"prompt": "p", "score": ' + DIGITS + "}", "field 'score' is 777777777777...777777"),
        ('{"prompt": "p", "score": ' + DIGITS + "}", "an integer of 5,000 digits is too long"),
        ('{"prompt": "p", "metadata": {"score": NaN}}', "field 'metadata.score' is NaN"),
        (
            '{"prompt": "p", "completions": [{"text": "a", "generation": {"t": Infinity}}, "b"],'
            ' "ranking": [[0], [1]]}',
            "field 'completions[0].generation.t' is Infinity: JSON has no NaN or Infinity",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi", "w": -Infinity}]}',
            "field 'messages[0].w' is -Infinity",
        ),
        ('{"prompt": "p", "metadata": {"big": 1e400}}', "beyond the range of a float"),
        ('{"prompt": NaN}', "field 'prompt' must be a string, not the number NaN"),
        (
            '{"prompt": "p", "completions": ["a", "b"], "ranking": [[NaN], [1]]}',
            "ranking[0] holds NaN",
        ),
        ('{"prompt": "p", "metadata": {"note": "a\\u0000b"}}', "'metadata.note' contains a NUL"),
        ('{"prompt": "p", "tags": ["ok", "\\ud800"]}', "'tags[1]' contains an unpaired surrogate"),
        ('{"prompt": "p", "a\\u0000b": 1}', "the record has a field name with a NUL character"),
    ],
)
def test_json_the_database_cannot_store_is_refused_naming_its_line_and_field(
    project, admin_user, line, words
):
    data = ('{"prompt": "fine"}\n' + line + "\n").encode()
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(data), fmt="jsonl", user=admin_user)
    assert err.value.line == 2
    assert words in err.value.message
    assert nothing_stored(project)


@pytest.mark.parametrize(
    ("cell", "words"),
    [
        ('{""s"": NaN}', "field 'metadata.s' is NaN"),
        ('{""s"": ' + DEEP + "}", "nested too deeply"),
        ('{""n"": ' + DIGITS + "}", "5,000 digits"),
    ],
)
def test_a_csv_json_cell_the_database_cannot_store_is_refused(project, admin_user, cell, words):
    data = f'prompt,metadata\nfine,\nq,"{cell}"\n'.encode()
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=io.BytesIO(data), fmt="csv", user=admin_user)
    assert err.value.line == 3 and words in err.value.message
    assert nothing_stored(project)


# --------------------------------------------------------------------------- what makes no item


@pytest.mark.parametrize(
    ("record", "words"),
    [
        (
            {"prompt": "p", "completions": ["same", "same"], "ranking": [[0], [1]]},
            "field 'completions[1]' is the same text as completions[0]",
        ),
        (
            {"prompt": "p", "completions": ["a", "b", "a", "c"]},
            "field 'completions[2]' is the same text as completions[0]",
        ),
        ({"prompt": "p", "chosen": "x", "rejected": "x"}, "'chosen' and 'rejected' are the same"),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: x", "rejected": "\n\nHuman: q\n\nAssistant: x"},
            "'chosen' and 'rejected' are the same",
        ),
        (
            {"prompt": "p", "completion": "a", "completions": ["b", "c"]},
            "either 'completion' (a demonstration) or 'completions'",
        ),
    ],
)
def test_a_record_that_would_show_one_text_twice_is_refused(project, admin_user, record, words):
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=jsonl({"prompt": "ok"}, record), user=admin_user)
    assert err.value.line == 2 and words in err.value.message
    assert nothing_stored(project)


@pytest.mark.parametrize("n", [1, 3])
def test_unranked_completions_that_do_not_fill_items_of_k_are_refused(admin_user, n):
    project = services.project_create(name="Pairs", created_by=admin_user, k=2)
    record = {"prompt": "p", "completions": [f"c{i}" for i in range(n)]}
    with pytest.raises(ImportFileError) as err:
        import_file(project=project, fileobj=jsonl({"prompt": "ok"}, record), user=admin_user)
    assert err.value.line == 2
    assert f"field 'completions' holds {n}, which does not make items of K=2" in err.value.message
    assert "wait_for_k" in err.value.message
    assert nothing_stored(project)


def test_wait_for_k_keeps_the_completions_left_over(admin_user):
    project = services.project_create(name="Pairs", created_by=admin_user, k=2)
    report = import_file(
        project=project,
        fileobj=jsonl(
            {"prompt": "three", "completions": ["a", "b", "c"]},
            {"prompt": "one", "completions": ["d"]},
            {"prompt": "four", "completions": ["e", "f", "g", "h"]},
        ),
        user=admin_user,
        wait_for_k=True,
    )
    assert (report.prompts, report.completions, report.items) == (3, 8, 3)


def test_a_demonstration_is_a_prompt_with_one_completion_and_no_item(project, admin_user):
    report = import_file(
        project=project,
        fileobj=jsonl({"prompt": "Write a haiku.", "completion": "old pond / a frog"}),
        user=admin_user,
    )
    assert (report.prompts, report.completions, report.items, report.rankings) == (1, 1, 0, 0)
    prompt = Prompt.objects.get(project=project)
    assert prompt.metadata == {}
    assert list(prompt.completions.values_list("text", flat=True)) == ["old pond / a frog"]


# --------------------------------------------------------------------------- size


class _Stream(io.RawIOBase):
    """A file that cannot seek, as a pipe or a socket."""

    def __init__(self, data: bytes):
        self.inner = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        chunk = self.inner.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("seekable", [True, False])
def test_a_file_over_max_bytes_is_refused_whole_naming_the_limit(project, admin_user, seekable):
    data = b"".join(b'{"prompt": "p%d"}\n' % i for i in range(200))
    fileobj = io.BytesIO(data) if seekable else io.BufferedReader(_Stream(data))
    with pytest.raises(ImportTooLarge) as err:
        import_file(project=project, fileobj=fileobj, user=admin_user, max_bytes=1024)
    assert "over the import limit of 1 KiB (IMPORT_MAX_BYTES)" in str(err.value)
    assert ("the file is 3.6 KiB, over" in str(err.value)) == seekable
    assert nothing_stored(project)
    fits = import_file(
        project=project, fileobj=io.BytesIO(data), user=admin_user, max_bytes=len(data)
    )
    assert fits.prompts == 200
