"""Export of rankings and pairwise preferences as JSONL (labeling.importexport)."""

import io
import json
from math import comb

import pytest
from django.core.management import call_command

from labeling import services
from labeling.importexport import (
    EXPORT_KINDS,
    borda_consensus,
    export_jsonl,
    export_rows,
    import_file,
    ranking_pairs,
)
from labeling.models import ItemCompletion, Membership, Ranking
from tests.labeling.chat import CHAT, said

pytestmark = pytest.mark.django_db


def jsonl_bytes(rows) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode() for r in rows)


def rank(user, item, groups_of_positions, **extra):
    """Lease `item` to `user` and submit groups given as positions 0..K-1 of the item."""
    ids = list(item.item_completions.order_by("position").values_list("completion_id", flat=True))
    lease = services.assignment_next(project=item.project, user=user)
    assert lease is not None and lease.item_id == item.pk
    groups = [[ids[p] for p in group] for group in groups_of_positions]
    return services.ranking_submit(user=user, item_id=item.pk, groups=groups, **extra)


@pytest.fixture
def three_labelers(project, make_user):
    users = [make_user(f"labeler-{i}") for i in range(3)]
    for u in users:
        services.membership_set(project=project, user=u, role=Membership.Role.LABELER)
    project.annotations_per_item = 3
    project.save(update_fields=["annotations_per_item"])
    return users


def test_rankings_export_has_one_row_per_ranking_with_labeler_timing_and_display_order(
    project, labeler, make_items
):
    item = make_items(project, 1)[0]
    ranking = rank(labeler, item, [[2], [0], [1, 3]], rationale="2 is correct", seconds_spent=12.5)
    rows = list(export_rows(project=project, kind="rankings"))
    assert len(rows) == 1
    row = rows[0]
    ids = [c["id"] for c in row["completions"]]
    assert row["ranking_id"] == ranking.pk and row["item_id"] == item.pk
    assert row["prompt"] == item.prompt.text
    assert [c["text"] for c in row["completions"]] == [f"Answer {j} to prompt 0" for j in range(4)]
    assert row["labeler"] == labeler.username
    assert row["groups"] == [[ids[2]], [ids[0]], [ids[1], ids[3]]]
    assert (row["rationale"], row["seconds_spent"], row["source"]) == (
        "2 is correct",
        12.5,
        "labeler",
    )
    assert (
        sorted(row["display_order"]) == sorted(ids)
        and row["display_order"] == ranking.display_order
    )
    assert row["created_at"].startswith(str(ranking.created_at.date()))


def test_pairs_expansion_gives_k_choose_2_pairs_minus_tied_pairs(
    project, three_labelers, make_items
):
    item = make_items(project, 1)[0]  # K = 4
    rank(three_labelers[0], item, [[0], [1], [2], [3]])  # 6 pairs
    rank(three_labelers[1], item, [[3], [1, 2], [0]])  # 6 - 1 tie = 5 pairs
    rank(three_labelers[2], item, [[0, 1, 2, 3]])  # all tied: 0 pairs
    pairs = list(export_rows(project=project, kind="pairs"))
    assert len(pairs) == comb(4, 2) + (comb(4, 2) - 1) + 0 == 11
    answer = [f"Answer {j} to prompt 0" for j in range(4)]
    assert pairs[0] == {"prompt": item.prompt.text, "chosen": answer[0], "rejected": answer[1]}
    second = [(p["chosen"], p["rejected"]) for p in pairs[6:]]
    assert (answer[1], answer[2]) not in second and (answer[2], answer[1]) not in second
    assert (answer[3], answer[1]) in second and (answer[2], answer[0]) in second


def test_ranking_pairs_and_borda_consensus_helpers():
    assert list(ranking_pairs([[1], [2, 3]])) == [(1, 2), (1, 3)]
    # Scores: 1 -> 2+2+0 = 4, 2 -> 1+0+2 = 3, 3 -> 0+1+1 = 2 ... a clear order.
    assert borda_consensus([[[1], [2], [3]], [[1], [3], [2]], [[2], [3], [1]]], [1, 2, 3]) == [
        [1],
        [2],
        [3],
    ]
    # Two opposite rankings cancel out into one tie.
    assert borda_consensus([[[1], [2]], [[2], [1]]], [1, 2]) == [[1, 2]]


def test_consensus_export_gives_one_borda_ranking_per_item(project, three_labelers, make_items):
    first, second = make_items(project, 2)
    rank(three_labelers[0], first, [[0], [1], [2], [3]])
    rank(three_labelers[1], first, [[0], [2], [1], [3]])
    rank(three_labelers[2], first, [[1], [0], [2], [3]])
    rank(three_labelers[0], second, [[3], [2], [1], [0]])
    rows = list(export_rows(project=project, kind="rankings", consensus=True))
    assert [r["item_id"] for r in rows] == [first.pk, second.pk]
    ids = [c["id"] for c in rows[0]["completions"]]
    # Borda: c0 = 3+3+2 = 8, c1 = 2+1+3 = 6, c2 = 1+2+1 = 4, c3 = 0
    assert rows[0]["groups"] == [[ids[0]], [ids[1]], [ids[2]], [ids[3]]]
    assert (rows[0]["num_rankings"], rows[0]["source"], rows[0]["labeler"]) == (
        3,
        "consensus",
        None,
    )
    assert rows[1]["num_rankings"] == 1
    pairs = list(export_rows(project=project, kind="pairs", consensus=True))
    assert len(pairs) == 2 * comb(4, 2)  # one ranking per item, not four
    assert (
        pairs[0]["chosen"] == "Answer 0 to prompt 0"
        and pairs[0]["rejected"] == "Answer 1 to prompt 0"
    )


def test_import_then_export_gives_back_the_pairs_and_rankings(project, admin_user):
    pairs = [
        {
            "prompt": "Why is the sky blue?",
            "chosen": "Rayleigh scattering.\r\n",
            "rejected": " Because. ",
        },
        {"prompt": "caf\u00e9 \U0001f600?", "chosen": "e\u0301", "rejected": "\u00e9"},
    ]
    ranked = {"prompt": "Order these", "completions": ["b", "a", "c"], "ranking": [[1], [0, 2]]}
    import_file(project=project, fileobj=io.BytesIO(jsonl_bytes([*pairs, ranked])), user=admin_user)
    exported = list(export_rows(project=project, kind="pairs"))
    assert exported[:2] == pairs
    assert exported[2:] == [
        {"prompt": "Order these", "chosen": "a", "rejected": "b"},
        {"prompt": "Order these", "chosen": "a", "rejected": "c"},
    ]
    rankings = list(export_rows(project=project, kind="rankings"))
    assert [r["source"] for r in rankings] == ["import"] * 3
    assert [r["labeler"] for r in rankings] == [None] * 3
    last = rankings[2]
    by_text = {c["text"]: c["id"] for c in last["completions"]}
    assert last["groups"] == [[by_text["a"]], [by_text["b"], by_text["c"]]]


def test_hh_round_trip_is_byte_for_byte(project, admin_user):
    rows = [
        {
            "chosen": "\n\nHuman: Hi \U0001f600\n\nAssistant: Hello!\n\nHuman: Colour?\n\nAssistant: Blue.  ",
            "rejected": "\n\nHuman: Hi \U0001f600\n\nAssistant: Hello!\n\nHuman: Colour?\n\nAssistant: I won't say.\r\n",
        },
        {
            "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4!",
        },
        {
            "chosen": "\n\nHuman: no space\n\nAssistant:yes",
            "rejected": "\n\nHuman: no space\n\nAssistant:no",
        },
    ]
    original = jsonl_bytes(rows)
    import_file(project=project, fileobj=io.BytesIO(original), user=admin_user)
    assert b"".join(export_jsonl(project=project, kind="hh")) == original


def test_hh_export_of_plain_pairs_is_hh_dialogues_that_import_back(project, admin_user):
    plain = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": " Lyon."}]
    import_file(project=project, fileobj=io.BytesIO(jsonl_bytes(plain)), user=admin_user)
    exported = b"".join(export_jsonl(project=project, kind="hh"))
    assert json.loads(exported) == {
        "chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
        "rejected": "\n\nHuman: Capital of France?\n\nAssistant:  Lyon.",
    }
    other = services.project_create(name="From the HH file", created_by=admin_user)
    import_file(project=other, fileobj=io.BytesIO(exported), user=admin_user)
    assert b"".join(export_jsonl(project=other, kind="hh")) == exported


def test_export_is_scoped_to_the_project(project, admin_user):
    other = services.project_create(name="Other", created_by=admin_user)
    import_file(
        project=other,
        fileobj=io.BytesIO(b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n'),
        user=admin_user,
    )
    assert list(export_rows(project=project, kind="pairs")) == []
    assert len(list(export_rows(project=other, kind="pairs"))) == 1


def test_datasets_load_dataset_reads_every_export_kind(
    project, admin_user, labeler, make_items, tmp_path
):
    datasets = pytest.importorskip("datasets")
    import_file(
        project=project,
        fileobj=io.BytesIO(
            jsonl_bytes(
                [
                    {
                        "chosen": "\n\nHuman: a\n\nAssistant: b",
                        "rejected": "\n\nHuman: a\n\nAssistant: c",
                    },
                    {"prompt": "p", "chosen": "x", "rejected": "y", "metadata": {"k": 1}},
                ]
            )
        ),
        user=admin_user,
    )
    item = make_items(project, 1)[0]
    rank(labeler, item, [[0], [1, 2], [3]], seconds_spent=3.0)
    expected = {"rankings": 3, "pairs": 2 + 5, "hh": 2 + 5}
    for kind, n in expected.items():
        for consensus in (False, True):
            path = tmp_path / f"{kind}-{consensus}.jsonl"
            call_command(
                "export_data",
                str(project.pk),
                "--kind",
                kind,
                "--output",
                str(path),
                *(["--consensus"] if consensus else []),
            )
            ds = datasets.load_dataset(
                "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
            )
            assert ds.num_rows == n, (kind, consensus)
            if kind == "pairs":
                assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
                assert ds[0] == {"prompt": "a", "chosen": "b", "rejected": "c"}
            if kind == "rankings" and not consensus:
                assert ds[2]["labeler"] == labeler.username and ds[0]["labeler"] is None
                assert ds[1]["metadata"]["k"] == 1
            if kind == "rankings" and consensus:
                assert ds["source"] == ["consensus"] * 3


def test_export_pages_through_chunks_in_order(project, admin_user):
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(1234)]
    import_file(project=project, fileobj=io.BytesIO(jsonl_bytes(rows)), user=admin_user)
    assert list(export_rows(project=project, kind="pairs")) == rows  # 3 chunks of 500
    consensus = list(export_rows(project=project, kind="rankings", consensus=True))
    assert [r["prompt"] for r in consensus] == [r["prompt"] for r in rows]


# --------------------------------------------------------------------------- export, then import


def stored_preferences(project) -> tuple[set, set, list]:
    """(prompts, completions, preference pairs) of a project's rankings: prompts as (prompt,
    metadata), completions as (prompt, completion text), pairs as a sorted list of (prompt,
    better text, worse text), where a prompt is its turns (as JSON) when it is a conversation
    (its text is their rendering) and its text otherwise."""
    prompts, completions, pairs = set(), set(), []
    for ranking in Ranking.objects.filter(item__project=project).select_related("item__prompt"):
        prompt = ranking.item.prompt
        key = json.dumps(prompt.messages) if prompt.messages else prompt.text
        texts = dict(
            ItemCompletion.objects.filter(item=ranking.item).values_list(
                "completion_id", "completion__text"
            )
        )
        prompts.add((key, json.dumps(prompt.metadata)))
        completions.update((key, text) for text in texts.values())
        pairs += [(key, texts[b], texts[w]) for b, w in ranking_pairs(ranking.groups)]
    return prompts, completions, sorted(pairs)


def conversation_item(project, texts):
    prompt = services.prompt_create(project=project, text="", messages=CHAT)
    completions = [services.completion_create(prompt=prompt, text=t) for t in texts]
    return services.item_create(project=project, prompt=prompt, completions=completions)


def test_conversations_export_in_trl_conversational_formats(
    project, admin_user, labeler, make_items
):
    plain = make_items(project, 1)[0]
    chat = conversation_item(project, ["a", "b", "c", "d"])
    rank(labeler, plain, [[0], [1, 2, 3]])
    rank(labeler, chat, [[1], [0, 2, 3]])
    pairs = list(export_rows(project=project, kind="pairs"))
    text = plain.prompt.text
    assert pairs[0] == {
        "prompt": text,
        "chosen": "Answer 0 to prompt 0",
        "rejected": "Answer 1 to prompt 0",
    }
    assert pairs[3] == {"prompt": CHAT, "chosen": said("b"), "rejected": said("a")}
    rankings = list(export_rows(project=project, kind="rankings"))
    assert rankings[0]["prompt"] == text and rankings[1]["prompt"] == CHAT
    hh = list(export_rows(project=project, kind="hh"))
    assert hh[3] == {
        "chosen": "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour of the sky?"
        "\n\nAssistant: b",
        "rejected": "Be brief.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour of the sky?"
        "\n\nAssistant: a",
    }


def test_datasets_reads_a_conversational_pairs_export(project, admin_user, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {"prompt": CHAT, "chosen": said(f"good {i}"), "rejected": said(f"bad {i}")}
        for i in range(3)
    ]
    import_file(project=project, fileobj=io.BytesIO(jsonl_bytes(rows)), user=admin_user)
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"".join(export_jsonl(project=project, kind="pairs")))
    ds = datasets.load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds.num_rows == 3 and ds[1] == rows[1]


@pytest.mark.parametrize("kind", EXPORT_KINDS)
def test_every_export_kind_imports_back_to_the_same_prompts_completions_and_preferences(
    project, admin_user, labeler, make_items, kind
):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    imported = [
        {"prompt": "Why is the sky blue?", "chosen": "Rayleigh.\r\n", "rejected": " Because. "},
        {"prompt": "Order", "completions": ["b", "a", "c"], "ranking": [[1], [0, 2]]},
        {"messages": chat, "completions": ["Hello.", "Hi!"], "ranking": [[1], [0]]},
        {"prompt": "tagged", "chosen": "y", "rejected": "n", "metadata": {"topic": "t"}},
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour?\n\nAssistant: Blue.",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Colour?\n\nAssistant: Red",
        },
        {
            "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5",
        },
        {"prompt": CHAT, "chosen": said("Blue."), "rejected": said("Green.")},
        {"chosen": [*CHAT[1:], *said("Blue!")], "rejected": [*CHAT[1:], *said("Red.")]},
        {"prompt": CHAT, "completions": [said("x"), "y", "z"], "ranking": [[2], [0], [1]]},
    ]
    import_file(project=project, fileobj=io.BytesIO(jsonl_bytes(imported)), user=admin_user)
    item = make_items(project, 1)[0]
    rank(labeler, item, [[2], [0, 3], [1]])
    chat_item = conversation_item(project, [f"Answer {j}" for j in range(4)])
    rank(labeler, chat_item, [[1], [3], [0, 2]])

    exported = b"".join(export_jsonl(project=project, kind=kind))
    fresh = services.project_create(name="Imported back", created_by=admin_user, k=2)
    import_file(project=fresh, fileobj=io.BytesIO(exported), user=admin_user)

    source, back = stored_preferences(project), stored_preferences(fresh)
    if kind == "rankings":
        assert back[0] == source[0]  # prompts and metadata
    else:  # pairs and HH dialogues carry no metadata
        assert {p[0] for p in back[0]} == {p[0] for p in source[0]}
    assert back[1] == source[1]
    assert back[2] == source[2]
    # The same pairs, in the same order.
    assert [
        {k: v for k, v in r.items() if k in ("prompt", "chosen", "rejected")}
        for r in export_rows(project=fresh, kind="pairs")
    ] == [
        {k: v for k, v in r.items() if k in ("prompt", "chosen", "rejected")}
        for r in export_rows(project=project, kind="pairs")
    ]


def test_a_rankings_row_carries_its_ranking_as_indexes_and_imports_without_its_bookkeeping(
    project, admin_user, labeler, make_items
):
    item = make_items(project, 1)[0]
    rank(labeler, item, [[3], [0, 1], [2]], rationale="r", seconds_spent=2.0)
    row = next(export_rows(project=project, kind="rankings"))
    ids = [c["id"] for c in row["completions"]]
    assert row["ranking"] == [[3], [0, 1], [2]]
    assert row["groups"] == [[ids[3]], [ids[0], ids[1]], [ids[2]]]
    assert row["prompt"] == item.prompt.text and "messages" not in row
    fresh = services.project_create(name="Back", created_by=admin_user)
    import_file(project=fresh, fileobj=io.BytesIO(jsonl_bytes([row])), user=admin_user)
    prompt = fresh.prompts.get()
    assert prompt.metadata == {} and prompt.messages is None
    assert Ranking.objects.get(item__project=fresh).source == "import"
