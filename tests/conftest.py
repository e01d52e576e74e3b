import pytest

from apollo.config import ModelConfig


def tiny_model_config(arch: str = "bert", layers: int = 12) -> ModelConfig:
    return ModelConfig(arch=arch, layers=layers, hidden=32, heads=2, ffn=64, vocab=512, seq_len=16, dropout=0.0)


@pytest.fixture(params=["bert", "gpt2"])
def arch(request):
    return request.param
