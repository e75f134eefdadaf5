"""Job warnings from the job's own metrics: an RL reward that rises because responses hit the
length cap, and a reward model that memorised its pairs, said in plain words on the job page
and in what the page polls."""

from __future__ import annotations

import pytest
from django.urls import reverse

from training import services
from training.diagnostics import warnings_for

# --------------------------------------------------------------------------- rules alone


def _series(**curves):
    return {
        key.replace("__", "/"): [[i + 1, v] for i, v in enumerate(vs)] for key, vs in curves.items()
    }


def _codes(warnings):
    return [w["code"] for w in warnings]


def test_a_reward_that_climbs_while_responses_sit_at_the_cap_and_stop_ending_is_named():
    # the demo's PPO: 80 steps, lengths grow to the 16-token cap, EOS rate falls to 0.01
    n = 80
    series = _series(
        objective__reward=[0.2 + 0.02 * i for i in range(n)],
        response__length=[min(16.0, 9 + 0.2 * i) for i in range(n)],
        response__ended_with_eos=[max(0.01, 0.6 - 0.02 * i) for i in range(n)],
    )
    warnings = warnings_for("ppo", {"max_new_tokens": 16}, series)
    assert _codes(warnings) == ["length_cap", "eos_collapse"]
    cap = warnings[0]["message"]
    assert "mean length is 16.0 of max_new_tokens=16" in cap and "1% of them end with EOS" in cap
    assert "the reward rose from" in cap and "missing_eos_penalty" in cap
    assert "fell from 45% (steps 1-16) to 1%" in warnings[1]["message"]  # 16-step windows


def test_an_eos_rate_that_rose_then_collapsed_while_the_reward_climbed_is_named():
    # seen on a demo GRPO: EOS ~0.05 at first, learned to 0.98 by step 16, down to 0.36 at the
    # end while the reward rose from 0.3 to 1.6 and the length from 5 to 13.7 of 16
    eos = [0.05] * 6 + [0.98] * 10 + [0.98 - 0.062 * i for i in range(10)] + [0.36] * 6
    n = len(eos)
    series = _series(
        objective__reward=[0.3] * 16 + [0.3 + 0.08 * i for i in range(n - 16)],
        response__length=[5.0] * 16 + [5 + 0.55 * i for i in range(n - 16)],
        response__ended_with_eos=eos,
    )
    (warning,) = warnings_for("grpo", {"max_new_tokens": 16}, series)
    assert warning["code"] == "eos_collapse"
    assert "fell from 98%" in warning["message"] and "to 36%" in warning["message"]


def test_a_healthy_rl_run_gets_no_warning():
    n = 40
    series = _series(
        objective__reward=[0.2 + 0.02 * i for i in range(n)],
        response__length=[8.0 + (i % 3) for i in range(n)],
        response__ended_with_eos=[0.9] * n,
    )
    assert warnings_for("grpo", {"max_new_tokens": 16}, series) == []


def test_the_eos_rate_falling_without_a_climbing_reward_is_not_called_gaming():
    n = 40
    series = _series(
        objective__reward=[0.5 + (0.01 if i % 2 else -0.01) for i in range(n)],
        response__length=[8.0] * n,
        response__ended_with_eos=[max(0.0, 0.8 - 0.05 * i) for i in range(n)],
    )
    assert warnings_for("ppo", {"max_new_tokens": 16}, series) == []


def test_too_few_steps_say_nothing():
    series = _series(
        objective__reward=[0.1, 0.5, 0.9],
        response__length=[16.0] * 3,
        response__ended_with_eos=[0.0] * 3,
    )
    assert warnings_for("ppo", {"max_new_tokens": 16}, series) == []


def test_a_reward_model_that_memorised_a_tiny_held_out_set_gets_both_warnings():
    # the demo's reward model: training accuracy 1.0, held-out 0.50 on 12 pairs
    series = _series(
        reward__train_accuracy=[0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        reward__accuracy=[0.5],
        reward__eval_pairs=[12],
    )
    warnings = warnings_for("reward", {}, series)
    assert _codes(warnings) == ["small_held_out", "overfit"]
    assert "only 12 pairs" in warnings[0]["message"] and "±0.28" in warnings[0]["message"]
    assert "0.50 is far below training accuracy 1.00" in warnings[1]["message"]


def test_a_reward_model_that_generalises_on_enough_pairs_gets_no_warning():
    series = _series(
        reward__train_accuracy=[0.7, 0.75, 0.8, 0.82, 0.8, 0.81],
        reward__accuracy=[0.74, 0.78],
        reward__eval_pairs=[400, 400],
    )
    assert warnings_for("reward", {}, series) == []


def test_a_reward_model_without_a_held_out_set_says_so():
    series = _series(reward__train_accuracy=[0.7, 0.8, 0.9, 1.0, 1.0, 1.0])
    assert _codes(warnings_for("reward", {"eval_fraction": 0.0}, series)) == ["no_held_out"]


def test_a_dpo_policy_that_fits_its_pairs_but_not_held_out_ones_is_named():
    series = _series(
        rewards__accuracy=[0.5, 0.9, 1.0, 1.0, 1.0, 1.0],
        eval__rewards_accuracy=[0.5, 0.55],
    )
    (warning,) = warnings_for("dpo", {}, series)
    assert warning["code"] == "overfit" and "the DPO policy memorised" in warning["message"]


def test_kinds_without_rules_get_no_warning():
    assert warnings_for("sft", {}, _series(loss__sft=[3.0, 2.0, 1.0])) == []


# --------------------------------------------------------------------------- on the page


@pytest.mark.django_db
def test_the_job_page_and_its_metrics_endpoint_show_the_warnings(admin_client, admin_user, project):
    job = services.job_launch(
        kind="ppo",
        project=project,
        config={"max_steps": 20, "batch_size": 4, "max_new_tokens": 16},
        user=admin_user,
        base_model="tiny",
        reward_rule="length",
    )
    token = services.job_claim(job_id=job.pk, worker="w:1")
    points = []
    for step in range(1, 21):
        points += [
            (step, "objective/reward", 0.1 * step),
            (step, "response/length", 16.0 if step > 5 else 10.0),
            (step, "response/ended_with_eos", 0.0 if step > 5 else 0.7),
        ]
    assert services.metric_points_write(job_id=job.pk, token=token, points=points, step=20)

    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert 'id="job-warnings"' in page and 'data-code="length_cap"' in page
    assert "Responses sit at the length cap" in page and "Responses stopped ending" in page
    data = admin_client.get(reverse("training:job_metrics", args=[job.pk]), {"after": 0}).json()
    assert _codes(data["warnings"]) == ["length_cap", "eos_collapse"]
    api = admin_client.get(f"/api/training/jobs/{job.pk}/metrics").json()
    assert api["warnings"] == data["warnings"]


@pytest.mark.django_db
def test_a_job_with_healthy_metrics_shows_no_warning_box(admin_client, admin_user, project):
    job = services.job_launch(
        kind="reward",
        project=project,
        config={"max_steps": 4, "batch_size": 2},
        user=admin_user,
        base_model="tiny",
    )
    page = admin_client.get(reverse("training:job_detail", args=[job.pk])).content.decode()
    assert (
        '<ul id="job-warnings" class="tr-warnings" role="status" aria-live="polite" hidden>' in page
    )
