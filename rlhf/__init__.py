"""The training engine: torch + transformers + peft only. Never imports django or celery.

Contract (every algorithm keeps it):

    result = train_<algo>(config, data, *, output_dir, on_step=None, should_stop=None,
                          resume_from=None, **algo_inputs) -> TrainResult

- ``config``: the algorithm's dataclass from ``rlhf.config`` (build one from a dict with
  ``rlhf.config.config_from_dict(kind, dict)``, which raises ``ConfigError`` with a clear
  message on an unknown field, a wrong type or a bad value).
- ``data``: a list of plain dicts (the JSONL rows of the CLI, see ``rlhf.data``).
- ``on_step(step, metrics)`` is called after every optimizer step with namespaced metric
  keys (``loss/policy``, ``objective/kl``, ``objective/reward``, ``reward/accuracy``,
  ``perf/tokens_per_s``, ...) and ``progress/total_steps``.
- ``should_stop()`` is checked every step; when it returns True the run saves a checkpoint
  and returns with ``result.stopped = True``.
- Checkpoints are PEFT adapter folders (safetensors) plus ``state.json`` under
  ``output_dir/step-XXXXXXX``; ``result.checkpoint_dir`` is the last one. ``resume_from``
  (a checkpoint folder, or ``output_dir`` to take its latest) continues at the same step
  and data order.
- Errors: ``rlhf.errors.NonFiniteLossError`` (NaN/inf loss; no checkpoint is overwritten),
  ``rlhf.errors.OutOfMemoryError`` (names what to reduce), ``ConfigError``, ``DataError``;
  all subclass ``rlhf.errors.TrainingError``.
"""
