"""Shared fixtures for the engine tests (no Django, no database)."""

import pytest
import torch

# The CI machine has 2 cores shared by several processes: one thread is faster than two here.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-shaped model folder (random weights, offline BPE tokenizer), built once."""
    from rlhf.modeling import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def sft_rows():
    """Four short demonstrations."""
    return [
        {
            "prompt": "What is the capital of France?",
            "completion": " Paris is the capital of France.",
        },
        {"prompt": "Say hello.", "completion": " Hello, how are you?"},
        {"prompt": "What is two plus two?", "completion": " It is four."},
        {"prompt": "Name a fruit.", "completion": " An apple."},
    ]
