"""Conversations through training: an imported multi-turn project's snapshot rows carry the
turns, and the real worker trains a reward model on them and samples answers to them into
the labeling queue."""

from __future__ import annotations

import io
import json

import pytest

from labeling import services as labeling_services
from labeling.importexport import import_file
from labeling.models import Completion, Item
from tests.training.worker_fixtures import wait_for
from training import selectors, services
from training.models import Job

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a kind assistant."},
        {"role": "user", "content": f"Hi, I have a question about {topic}."},
        {"role": "assistant", "content": "Of course, ask away!"},
        {"role": "user", "content": f"What is the best thing about {topic}?"},
    ]
    for topic in ("bees", "tea", "rivers", "maps", "bread", "snow")
]
ANSWERS = ["Thank you for asking! It is lovely.", "Fine.", "Who cares.", "No idea, go away."]


def _conversation_project(user):
    project = labeling_services.project_create(name="Chats", created_by=user, k=4)
    lines = [
        json.dumps({"messages": turns, "completions": ANSWERS, "ranking": [[0], [1], [2], [3]]})
        for turns in CONVERSATIONS
    ]
    import_file(project=project, fileobj=io.BytesIO("\n".join(lines).encode()), fmt="jsonl")
    return project


@pytest.mark.django_db
def test_the_snapshot_rows_of_a_conversation_project_carry_the_turns(admin_user):
    project = _conversation_project(admin_user)
    rows = selectors.input_rows(
        input_kind=Job.Input.RANKINGS, ids=selectors.ranking_ids_for_project(project=project)
    )
    assert len(rows) == 6
    assert rows[0]["messages"] == CONVERSATIONS[0]
    assert rows[0]["completions"] == ANSWERS and rows[0]["ranking"] == [[0], [1], [2], [3]]
    prompts = selectors.input_rows(
        input_kind=Job.Input.PROMPTS, ids=selectors.prompt_ids_for_project(project=project)
    )
    assert [r["messages"] for r in prompts] == CONVERSATIONS


@pytest.mark.django_db(transaction=True)
def test_the_worker_trains_a_reward_model_on_conversations_and_samples_answers_to_them(
    worker, admin_user
):
    project = _conversation_project(admin_user)
    small = {"max_steps": 3, "batch_size": 2, "max_seq_len": 96, "save_every": 0}
    reward = services.job_launch(kind="reward", project=project, config=small, user=admin_user)
    sample = services.job_launch(
        kind="sample",
        project=project,
        config={"num_completions": 4, "max_new_tokens": 4, "batch_size": 4},
        user=admin_user,
        options={"max_prompts": 3},
    )
    for job in (reward, sample):
        done = wait_for(
            lambda job=job: (j := Job.objects.get(pk=job.pk)).status in Job.FINAL_STATUSES and j,
            timeout=120,
            message=f"{job.kind} job to finish",
            details=worker.log,
        )
        assert done.status == Job.Status.SUCCEEDED, done.error or done.log_tail
    # four sampled answers to each of the first three conversations, queued as items of K = 4
    sampled = Item.objects.filter(project=project, source=Item.Source.QUEUE)
    assert sampled.count() == 3 and all(i.completions.count() == 4 for i in sampled)
    assert Completion.objects.filter(prompt__project=project, source="model").count() == 12
    assert [i.prompt.messages for i in sampled.order_by("id")] == CONVERSATIONS[:3]
