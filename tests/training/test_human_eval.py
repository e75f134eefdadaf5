"""The human win rate of an A-vs-B evaluation: the labelers' rankings of the items it sent,
added up beside the reward model's verdict, on the job page and in the API's result."""

from __future__ import annotations

import pytest
from django.urls import reverse

from labeling import services as labeling_services
from labeling.models import Item, Membership
from training import services
from training.evaluation import win_rate

pytestmark = pytest.mark.django_db


def test_win_rate_counts_a_tie_as_half_with_a_wilson_interval():
    r = win_rate(wins=6, ties=2, losses=2)
    assert r["win_rate"] == pytest.approx(0.7) and r["n"] == 10
    # Wilson 95% for p = 0.7, n = 10: 0.3968 .. 0.8922
    assert r["ci_low"] == pytest.approx(0.3968, abs=1e-3)
    assert r["ci_high"] == pytest.approx(0.8922, abs=1e-3)
    assert win_rate(wins=0, ties=0, losses=0)["win_rate"] is None
    assert win_rate(wins=3, ties=0, losses=0)["ci_high"] == 1.0


def _launch_eval(project, user, **options):
    """An evaluation of a registered policy checkpoint against the base model."""
    sft = services.job_launch(
        kind="sft", project=project, config={"max_steps": 2}, user=user, base_model="tiny"
    )
    a = services.checkpoint_register(job=sft, path="/ckpt/a", role="policy", step=2)
    job = services.job_launch(
        kind="eval",
        project=project,
        config={},
        user=user,
        base_model="tiny",
        parent_checkpoint=a,
        reward_rule="length",
        options=options,
    )
    return job, a


def _eval_job(project, user):
    job, a = _launch_eval(project, user, send_to_labelers=True)
    token = services.job_claim(job_id=job.pk, worker="w:1")
    prompts = list(project.prompts.order_by("id").values_list("id", flat=True)[:3])
    # the reward model prefers A on the first two prompts and B on the third
    pairs = [
        {"prompt_id": prompts[0], "a": "A answer 0", "b": "B 0", "reward_a": 0.9, "reward_b": 0.1},
        {"prompt_id": prompts[1], "a": "A answer 1", "b": "B 1", "reward_a": 0.8, "reward_b": 0.2},
        {"prompt_id": prompts[2], "a": "A 2", "b": "B answer 2", "reward_a": 0.1, "reward_b": 0.7},
    ]
    sent = services.eval_pairs_store(job=job, pairs=pairs, checkpoint_a=a, checkpoint_b=None)
    services.job_finish(
        job_id=job.pk,
        token=token,
        status="succeeded",
        result={"win_rate": 2 / 3, "wins": 2, "ties": 0, "losses": 1, "n": 3, "items_sent": sent},
    )
    job.refresh_from_db()
    return job


def _rank_all(project, user, choose):
    """`user` ranks every eval item they are given: choose(texts) -> groups of texts."""
    while (lease := labeling_services.assignment_next(project=project, user=user)) is not None:
        item = Item.objects.get(pk=lease.item_id)
        if item.source != Item.Source.EVAL:
            labeling_services.item_skip(user=user, item_id=item.pk)
            continue
        by_text = {c.text: c.pk for c in item.completions.all()}
        groups = [[by_text[t] for t in group] for group in choose(sorted(by_text))]
        labeling_services.ranking_submit(user=user, item_id=item.pk, groups=groups)


def test_labelers_rankings_of_the_sent_items_give_the_human_win_rate(
    admin_client, admin_user, labeler, make_user, project
):
    project.annotations_per_item = 2
    project.save(update_fields=["annotations_per_item"])
    job = _eval_job(project, admin_user)
    second = make_user("second-labeler")
    labeling_services.membership_set(project=project, user=second, role=Membership.Role.LABELER)

    # the first labeler always prefers A's text; the second calls the items with "answer 0"
    # and "answer 1" a tie and prefers B elsewhere
    def prefers_a(texts):
        a = next(t for t in texts if t.startswith("A"))
        return [[a], [t for t in texts if t != a]]

    def ties_or_b(texts):
        if any(t.endswith(("answer 0", "answer 1")) for t in texts):
            return [texts]
        b = next(t for t in texts if t.startswith("B"))
        return [[b], [t for t in texts if t != b]]

    _rank_all(project, labeler, prefers_a)
    _rank_all(project, second, ties_or_b)

    data = admin_client.get(f"/api/training/jobs/{job.pk}").json()
    human = data["result"]["human"]
    assert data["result"]["win_rate"] == pytest.approx(2 / 3)  # the reward model's, kept
    # 6 rankings: A wins 3 (first labeler), ties 2, B wins 1 -> (3 + 1) / 6
    assert (human["wins"], human["ties"], human["losses"]) == (3, 2, 1)
    assert human["win_rate"] == pytest.approx(4 / 6)
    assert 0 < human["ci_low"] < human["win_rate"] < human["ci_high"] < 1
    assert human["items_sent"] == 3 and human["items_ranked"] == 3
    # non-tie rankings: first labeler A,A,A vs reward model A,A,B -> 2 agree, 1 disagrees;
    # second labeler B on the third item -> agrees
    assert human["agreement_with_reward_model"] == pytest.approx(3 / 4)
    assert [it["reward_model"] for it in human["items"]] == ["a", "a", "b"]

    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert 'id="eval-human"' in page and "0.667" in page and "3 of 3 items ranked" in page
    assert "pick the same side in 0.75" in page


def test_an_evaluation_before_any_ranking_says_so(admin_client, admin_user, project):
    job = _eval_job(project, admin_user)
    human = admin_client.get(f"/api/training/jobs/{job.pk}").json()["result"]["human"]
    assert human["n"] == 0 and human["win_rate"] is None and human["items_sent"] == 3
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert "no rankings yet" in page


def test_an_evaluation_not_sent_to_labelers_has_no_human_result(admin_client, admin_user, project):
    job, _ = _launch_eval(project, admin_user)
    assert "human" not in admin_client.get(f"/api/training/jobs/{job.pk}").json()["result"]
