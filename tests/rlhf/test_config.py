import pytest

from rlhf.config import BaseConfig, config_class, config_from_dict, config_to_dict
from rlhf.errors import ConfigError
from rlhf.sampling import SampleConfig
from rlhf.sft import SFTConfig


def test_it_builds_an_sft_config_from_a_dict_and_back():
    cfg = config_from_dict(
        "sft", {"model": "m", "learning_rate": 1, "max_steps": 5, "target_modules": ["q_proj"]}
    )
    assert isinstance(cfg, SFTConfig)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.target_modules == ["q_proj"]
    assert config_from_dict("sft", config_to_dict(cfg)) == cfg


def test_it_suggests_the_right_name_for_an_unknown_field():
    with pytest.raises(ConfigError, match="unknown field 'lr'; did you mean 'learning_rate'"):
        config_from_dict("sft", {"model": "m", "lr": 1e-4})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        config_from_dict("sft", {"model": "m", "max_step": 3})


def test_it_rejects_a_value_of_the_wrong_type():
    with pytest.raises(ConfigError, match="'batch_size' must be an integer"):
        config_from_dict("sft", {"model": "m", "batch_size": "8"})
    with pytest.raises(ConfigError, match="'batch_size' must be an integer"):
        config_from_dict("sft", {"model": "m", "batch_size": 2.5})
    with pytest.raises(ConfigError, match="'chat_template' must be true or false"):
        config_from_dict("sft", {"model": "m", "chat_template": 1})
    with pytest.raises(ConfigError, match="'target_modules'"):
        config_from_dict("sft", {"model": "m", "target_modules": 3})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("learning_rate", 0, "learning_rate must be > 0"),
        ("batch_size", 0, "batch_size must be > 0"),
        ("warmup_ratio", 1.5, "warmup_ratio must be in"),
        ("lora_dropout", 1.0, "lora_dropout must be in"),
        ("eval_fraction", 1.0, "eval_fraction must be in"),
        ("dtype", "int8", "dtype must be"),
    ],
)
def test_it_rejects_a_value_out_of_range(field, value, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict("sft", {"model": "m", field: value})


def test_it_requires_a_model():
    with pytest.raises(ConfigError, match="model is required"):
        config_from_dict("sft", {})


def test_it_rejects_an_unknown_kind():
    with pytest.raises(ConfigError, match="unknown run kind 'rm'"):
        config_class("rm")


def test_sample_config_checks_its_own_fields():
    assert issubclass(SampleConfig, BaseConfig)
    with pytest.raises(ConfigError, match="top_p"):
        config_from_dict("sample", {"model": "m", "top_p": 0})
    cfg = config_from_dict("sample", {"model": "m", "num_completions": 3, "temperature": 0})
    assert cfg.num_completions == 3 and cfg.temperature == 0.0


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "ppo", "grpo", "sample"])
def test_every_kind_round_trips_through_a_json_dict(kind):
    import json

    from rlhf.config import CONFIG_CLASSES

    pytest.importorskip(CONFIG_CLASSES[kind].partition(":")[0])
    cfg = config_from_dict(kind, {"model": "m"})
    assert config_from_dict(kind, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
