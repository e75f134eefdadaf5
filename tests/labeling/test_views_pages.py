"""The pages: home, ranking page and its JSON endpoints, dashboard, members, import, export."""

import io
import json
import re

import pytest
from django.test import Client
from django.urls import reverse

from labeling import services
from labeling.importexport import import_file
from labeling.models import Assignment, Flag, Item, Membership, Project, Ranking

pytestmark = pytest.mark.django_db


@pytest.fixture
def labeler_client(labeler):
    client = Client()
    client.force_login(labeler)
    return client


def _post_json(client, url, body):
    return client.post(url, json.dumps(body), content_type="application/json")


def _shown_ids(html):
    return [int(x) for x in re.findall(r'data-completion-id="(\d+)"', html)]


def test_home_lists_my_projects_with_progress(labeler_client, project, make_items):
    make_items(project, 3)
    html = labeler_client.get(reverse("labeling:home")).content.decode()
    assert "Helpfulness" in html and "0 / 3 complete" in html


def test_the_ranking_page_shows_the_responses_in_the_labelers_display_order(
    labeler_client, labeler, project, make_items
):
    make_items(project, 2)
    html = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    lease = Assignment.objects.get(user=labeler)
    assert _shown_ids(html) == lease.display_order
    assert f'data-item-id="{lease.item_id}"' in html
    for hook in (
        'id="submit-ranking"',
        'id="skip-item"',
        'id="flag-item"',
        'id="done-count"',
        'id="new-rank"',
    ):
        assert hook in html


def test_the_ranking_page_shows_a_conversation_turn_by_turn_with_earlier_turns_folded(
    labeler_client, project
):
    turns = [{"role": "system", "content": "Be **brief**."}]
    for i in range(3):
        turns += [
            {"role": "user", "content": f"question {i} <script>alert(1)</script>"},
            {"role": "assistant", "content": f"answer {i} [x](javascript:alert(1))"},
        ]
    turns.append({"role": "user", "content": "the latest question"})
    prompt = services.prompt_create(project=project, text="", messages=turns)
    for i in range(project.k):
        services.completion_create(prompt=prompt, text=f"reply {i}")
    services.items_create_for_prompt(project=project, prompt=prompt)

    html = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    card = html.split('id="prompt"')[1].split('class="rank-layout"')[0]
    folded, _, shown = card.partition("</details>")
    assert "<summary>Show 5 earlier turns</summary>" in folded
    assert "question 0" in folded and "answer 1" in folded and "answer 2" not in folded
    assert "answer 2" in shown and "the latest question" in shown
    assert "<strong>brief</strong>" in folded.split("<details")[0]  # the system turn, in view
    assert '<span class="role">user</span>' in shown
    assert "<script>" not in card and "&lt;script&gt;" in card
    assert 'href="javascript:' not in card


def test_a_plain_prompt_is_shown_as_one_text(labeler_client, project, make_items):
    make_items(project, 1)
    html = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    assert "earlier-turns" not in html and 'class="role"' not in html
    assert "Prompt 0: what is 0 + 0?" in html


def test_next_preloads_another_item_and_submit_reports_the_done_count(
    labeler_client, labeler, project, make_items
):
    make_items(project, 3)
    html = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    current = int(re.search(r'data-item-id="(\d+)"', html).group(1))
    nxt = _post_json(
        labeler_client, reverse("labeling:label_next", args=[project.pk]), {"after": current}
    ).json()
    assert nxt["item_id"] not in (None, current)
    assert f'data-item-id="{nxt["item_id"]}"' in nxt["html"]
    response = _post_json(
        labeler_client,
        reverse("labeling:item_submit", args=[project.pk, current]),
        {
            "groups": [[c] for c in _shown_ids(html)],
            "rationale": "clear",
            "seconds_spent": 12.5,
            "display_order": _shown_ids(html),
        },
    )
    assert response.status_code == 200
    assert response.json()["done"] == 1
    ranking = Ranking.objects.get()
    assert (ranking.rationale, ranking.seconds_spent, ranking.display_order) == (
        "clear",
        12.5,
        _shown_ids(html),
    )
    # The reload after that shows the preloaded item.
    html2 = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    assert f'data-item-id="{nxt["item_id"]}"' in html2
    assert '<span id="done-count">1</span>' in html2


def test_an_invalid_ranking_gets_a_400_with_the_reason(
    labeler_client, labeler, project, make_items
):
    make_items(project, 1)
    html = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    item_id = int(re.search(r'data-item-id="(\d+)"', html).group(1))
    ids = _shown_ids(html)
    response = _post_json(
        labeler_client,
        reverse("labeling:item_submit", args=[project.pk, item_id]),
        {"groups": [[i] for i in ids[:3]]},
    )
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_ranking"
    assert "leaves out" in response.json()["error"]


def test_a_stale_item_gets_a_409(labeler_client, labeler, project, make_items):
    (item,) = make_items(project, 1)
    ids = [ic.completion_id for ic in item.item_completions.all()]
    response = _post_json(
        labeler_client,
        reverse("labeling:item_submit", args=[project.pk, item.pk]),
        {"groups": [[i] for i in ids]},
    )
    assert response.status_code == 409
    assert "was not handed to you" in response.json()["error"]


def test_skip_and_flag_endpoints(labeler_client, labeler, project, make_items):
    make_items(project, 2)
    first = services.assignment_next(project=project, user=labeler)
    assert (
        _post_json(
            labeler_client, reverse("labeling:item_skip", args=[project.pk, first.item_id]), {}
        ).status_code
        == 200
    )
    second = services.assignment_next(project=project, user=labeler)
    response = _post_json(
        labeler_client,
        reverse("labeling:item_flag", args=[project.pk, second.item_id]),
        {"reason": ""},
    )
    assert response.status_code == 400
    response = _post_json(
        labeler_client,
        reverse("labeling:item_flag", args=[project.pk, second.item_id]),
        {"reason": "two identical answers"},
    )
    assert response.status_code == 200
    assert Flag.objects.get().reason == "two identical answers"


def test_an_empty_queue_says_so(labeler_client, project):
    html = labeler_client.get(reverse("labeling:label", args=[project.pk])).content.decode()
    assert 'id="queue-empty"' in html


def test_the_dashboard_shows_progress_stats_and_flags(admin_client, labeler, project, make_items):
    make_items(project, 2)
    lease = services.assignment_next(project=project, user=labeler)
    services.ranking_submit(
        user=labeler,
        item_id=lease.item_id,
        groups=[[c] for c in lease.display_order],
        seconds_spent=7,
    )
    lease = services.assignment_next(project=project, user=labeler)
    services.item_flag(user=labeler, item_id=lease.item_id, reason="prompt is cut off")
    html = admin_client.get(
        reverse("labeling:project_dashboard", args=[project.pk])
    ).content.decode()
    assert '<span id="progress-complete">1</span> / <span id="progress-total">2</span>' in html
    assert "prompt is cut off" in html
    assert re.search(
        r"<td>bob-labeler</td><td class=\"num\">1</td>\s*<td class=\"num\">7.0</td>", html
    )


def test_the_dashboard_says_what_imported_items_are(admin_client, project, make_items):
    make_items(project, 1)
    rows = [
        {"prompt": f"Q{i}?", "completions": ["a", "b"], "ranking": [[1], [0]]} for i in range(2)
    ]
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    import_file(project=project, fileobj=io.BytesIO(data), user=project.created_by)
    html = admin_client.get(
        reverse("labeling:project_dashboard", args=[project.pk])
    ).content.decode()
    # the queue item is the progress; the imported ones are said apart, for what they are
    assert '<span id="progress-complete">0</span> / <span id="progress-total">1</span>' in html
    assert (
        "2 imported items with their ranking (not in the labeling queue, not counted in the "
        "progress above)" in html
    )


def test_an_admin_adds_a_member_by_username(admin_client, project, make_user):
    make_user("dora")
    response = admin_client.post(
        reverse("labeling:member_add", args=[project.pk]), {"username": "dora", "role": "labeler"}
    )
    assert response.status_code == 302
    assert Membership.objects.get(project=project, user__username="dora").role == "labeler"
    response = admin_client.post(
        reverse("labeling:member_add", args=[project.pk]),
        {"username": "nobody", "role": "labeler"},
        follow=True,
    )
    assert "There is no user named" in response.content.decode()


def test_staff_create_a_project_and_become_its_admin(make_user):
    staff = make_user("sam", is_staff=True)
    client = Client()
    client.force_login(staff)
    response = client.post(
        reverse("labeling:project_create"),
        {
            "name": "Tone",
            "instructions": "Be kind",
            "k": 3,
            "annotations_per_item": 2,
            "allow_ties": "on",
            "lease_seconds": 600,
        },
    )
    project = Project.objects.get(name="Tone")
    assert response["Location"] == reverse("labeling:project_dashboard", args=[project.pk])
    assert (project.k, project.annotations_per_item, project.lease_seconds) == (3, 2, 600)
    assert Membership.objects.get(project=project, user=staff).role == "admin"


def test_an_import_upload_then_an_export_download(admin_client, project):
    lines = [
        {"prompt": "Say hi", "completions": ["hi", "hello", "hey", "yo"]},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    ]
    upload = io.BytesIO("".join(json.dumps(x) + "\n" for x in lines).encode())
    upload.name = "data.jsonl"
    response = admin_client.post(
        reverse("labeling:project_import", args=[project.pk]), {"file": upload}, follow=True
    )
    assert "Imported data.jsonl" in response.content.decode()
    assert Item.objects.filter(project=project).count() == 2
    response = admin_client.get(
        reverse("labeling:project_export", args=[project.pk]) + "?kind=pairs"
    )
    assert response.status_code == 200
    rows = [json.loads(line) for line in b"".join(response.streaming_content).splitlines()]
    assert rows == [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}]


def test_a_bad_import_line_is_reported_and_nothing_is_stored(admin_client, project):
    upload = io.BytesIO(b'{"prompt": "ok"}\n{not json\n')
    upload.name = "bad.jsonl"
    response = admin_client.post(
        reverse("labeling:project_import", args=[project.pk]), {"file": upload}, follow=True
    )
    html = response.content.decode()
    assert "line 2" in html and "Nothing from this file was stored" in html
    assert not project.prompts.exists()


@pytest.mark.parametrize(
    "line",
    [
        b'{"prompt": "p", "metadata": {"x": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        b'{"prompt": "p", "n": ' + b"9" * 5000 + b"}",
        b'{"prompt": "p", "metadata": {"s": NaN}}',
        b'{"prompt": "p", "completions": ["same", "same", "a", "b"]}',
    ],
)
def test_an_import_of_what_cannot_be_stored_names_the_file_and_line_on_the_page(
    admin_client, project, line
):
    upload = io.BytesIO(b'{"prompt": "ok"}\n' + line + b"\n")
    upload.name = "probe.jsonl"
    response = admin_client.post(
        reverse("labeling:project_import", args=[project.pk]), {"file": upload}, follow=True
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert "probe.jsonl, line 2: " in html and "Nothing from this file was stored" in html
    assert not project.prompts.exists()


def test_an_import_over_the_size_limit_is_refused_on_the_page(admin_client, project, settings):
    settings.IMPORT_MAX_BYTES = 1000
    upload = io.BytesIO(b"".join(b'{"prompt": "p%d"}\n' % i for i in range(200)))
    upload.name = "big.jsonl"
    response = admin_client.post(
        reverse("labeling:project_import", args=[project.pk]), {"file": upload}, follow=True
    )
    html = response.content.decode()
    assert "big.jsonl: the file is" in html and "import limit of 1,000 bytes" in html
    assert not project.prompts.exists()


def test_the_import_form_offers_wait_for_k(admin_client, project):
    upload = io.BytesIO(b'{"prompt": "p", "completions": ["a", "b", "c", "d", "e"]}\n')
    upload.name = "five.jsonl"
    url = reverse("labeling:project_import", args=[project.pk])
    html = admin_client.post(url, {"file": upload}, follow=True).content.decode()
    assert "five.jsonl, line 1: field &#x27;completions&#x27; holds 5" in html
    assert 'name="wait_for_k"' in html
    upload.seek(0)
    admin_client.post(url, {"file": upload, "wait_for_k": "on"})
    assert project.items.count() == 1


def test_the_dashboard_shows_agreement_between_labelers(
    admin_client, labeler, project, make_user, make_items
):
    project.annotations_per_item = 2
    project.save()
    other = make_user("carl")
    services.membership_set(project=project, user=other, role="labeler")
    make_items(project, 1)
    for user in (labeler, other):
        lease = services.assignment_next(project=project, user=user)
        services.ranking_submit(
            user=user, item_id=lease.item_id, groups=[[c] for c in sorted(lease.display_order)]
        )
    html = admin_client.get(
        reverse("labeling:project_dashboard", args=[project.pk])
    ).content.decode()
    agreement = html.split('id="agreement"', 1)[1].split("</div>", 1)[0]
    assert '<p class="big">1.00</p>' in agreement
    assert "mean Kendall tau 1.00" in agreement and "1 shared item," in agreement
