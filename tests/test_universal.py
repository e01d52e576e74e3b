"""Every causal-LM and masked-LM architecture transformers ships, with no registration: found by enumerating the
library's own model mappings, built from a tiny config through ``--model-config``'s path (a saved config.json),
then inspected, run as a shared pass, grown 2 -> 4, FLOP-counted, saved and reloaded, and trained for 3 Apollo
steps. An architecture transformers cannot build at the tiny size is skipped with its error; one apollo refuses
must say why in one line (``ApolloError``); anything else failing is a bug.

``python tests/test_universal.py`` prints the table docs/architectures.md lists.
"""

from __future__ import annotations

import sys
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig
from transformers import logging as hf_logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from apollo.config import ApolloError, DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig
from apollo.data import load_lm_data
from apollo.measure.flops import StepFlops
from apollo.method.growth import expand_layers, layer_map, shared_layers
from apollo.models import (
    ADAPTERS,
    build_model,
    get_layers,
    inspect_adapter,
    is_masked,
    lm_class,
    lm_loss,
    model_adapter,
)
from apollo.runtime.train import head_tokens, train

MODEL_TYPES = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_MASKED_LM_MAPPING_NAMES))
SIZE = {"layers": 4, "hidden": 32, "heads": 2, "ffn": 64, "vocab": 512, "seq_len": 16}
MAX_PARAMS = 2_000_000  # a tiny config that is still bigger than this is not tiny (a vision tower, experts ...)
MAX_FORWARD_S = 2.0  # ... or whose tiny forward is this slow (a sequential scan at its default state size)
pytestmark = pytest.mark.sweep
# Layers whose behaviour is set from their index when built: a copied layer keeps its source's, a reloaded model
# recomputes them by position, so the saved model is not the trained one.
INDEX_DEPENDENT = {
    "diffllama": "each layer's lambda_init is computed from its index when built",
    "llama4_text": "which layers use rotary positions and chunked attention is fixed by index when built",
}


def tiny(model_type: str, tmp_path) -> ModelConfig:
    """The ModelConfig a user's ``--model-config`` gives: the architecture's default config, saved as config.json."""
    try:
        AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    except Exception as e:  # noqa: BLE001 - the library's default config fails its own check
        pytest.skip(f"transformers cannot save its default config: {type(e).__name__}")
    return ModelConfig(model_type, **SIZE, dropout=0.0, model_config=str(tmp_path))


def build(m: ModelConfig, live: int) -> nn.Module:
    """The tiny model with ``live`` of its layers, or a skip when transformers cannot build it at this size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.device("meta"):
                n = sum(p.numel() for p in build_model(m, m.layers, 0).parameters())
            if n > MAX_PARAMS:
                pytest.skip(f"not tiny: {n / 1e6:.0f}M parameters at hidden {m.hidden}")
            model = build_model(m, live, 0)
            model.config._attn_implementation = "eager"  # FlopCounterMode does not count CPU SDPA
            perturb(model)
            start = time.perf_counter()
            with torch.no_grad():  # the plain model, before apollo touches it
                model.eval()(input_ids=batch(m, False)["input_ids"])
            seconds = time.perf_counter() - start
    except ApolloError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own errors at a size its authors never meant
        pytest.skip(f"transformers cannot run it tiny: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    if seconds > MAX_FORWARD_S:
        pytest.skip(f"too slow to sweep: one tiny forward takes {seconds:.1f} s on this CPU")
    return model


def perturb(model: nn.Module) -> None:
    """Non-trivial weights (norms included), as after training: no post-LN layer is an identity by accident."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def batch(m: ModelConfig, mlm: bool) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, m.vocab, (2, m.seq_len), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    if mlm:
        labels[:, 1::3] = -100  # a masked LM predicts some positions
    return {"input_ids": ids, "labels": labels}


def layer_is_identity(model: nn.Module, b: dict) -> bool:
    """Whether a layer whose residual outputs are zero passes its input through unchanged (pre-LN)."""
    layer = get_layers(model)[0]
    seen = {}

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("hidden_states")
        y = output[0] if isinstance(output, tuple) else output
        seen["same"] = isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape \
            and torch.allclose(x, y, atol=1e-6)

    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.no_grad():
        for name in model_adapter(model).residual_outputs:
            for p in layer.get_submodule(name).parameters(recurse=False):
                p.zero_()
        handle = layer.register_forward_hook(hook, with_kwargs=True)
        try:
            lm_loss(model, b, is_masked(model.config.model_type))
        finally:
            handle.remove()
            layer.load_state_dict(saved)
    return seen.get("same", False)


def check(model_type: str, tmp_path, data: dict) -> str:
    """Every check of the module docstring; returns how growth behaved."""
    m = tiny(model_type, tmp_path / "config")
    try:
        lm_class(AutoConfig.for_model(model_type))
        model = build(m, 2)
        mlm = is_masked(model.config.model_type)
        assert len(get_layers(model)) == 2
        b = batch(m, mlm)
        flops = StepFlops(model.config)
        # a shared pass at a sampled depth costs its executed depth
        with FlopCounterMode(display=False) as counter:
            with shared_layers(model, layer_map("interpolation", 2, 3)):
                loss = lm_loss(model, b, mlm)
            loss.backward()
        assert torch.isfinite(loss)
        expected = flops.train(3, b["input_ids"].numel(), m.seq_len, head_tokens(b, mlm))
        assert abs(counter.get_total_flops() - expected) <= 0.02 * expected
        model.zero_grad(set_to_none=True)
        # 2 -> 4 by interpolation with zeroed copies keeps the function wherever a zeroed layer is the identity;
        # a model whose branch outputs are not found grows with copies, and zeroed growth is refused in one line
        found = bool(model_adapter(model).residual_outputs)
        identity = found and layer_is_identity(model, b)
        with torch.no_grad():
            before = lm_loss(model, b, mlm)
            if not found:
                with pytest.raises(ApolloError, match="no residual-output projections"):
                    expand_layers(model, 4, "interpolation", new_layers="zeroed")
            expand_layers(model, 4, "interpolation", new_layers="zeroed" if found else "copy")
            after = lm_loss(model, b, mlm)
        assert len(get_layers(model)) == 4 and getattr(model.config, "num_hidden_layers", 4) == 4
        if identity:
            assert torch.allclose(before, after, atol=1e-5), (before, after)
        with FlopCounterMode(display=False) as counter:
            lm_loss(model, b, mlm).backward()
        assert abs(counter.get_total_flops() - flops.train(4, b["input_ids"].numel(), m.seq_len,
                                                            head_tokens(b, mlm))) <= 0.02 * counter.get_total_flops()
        # the grown model saves and reloads with from_pretrained to the same loss (or, where a layer's behaviour
        # is fixed by its index when it is built, differs as INDEX_DEPENDENT says)
        model.save_pretrained(tmp_path / "grown")
        again = type(model).from_pretrained(tmp_path / "grown", attn_implementation="eager").eval()
        with torch.no_grad():
            same = torch.allclose(lm_loss(again, b, mlm), after, atol=1e-5)
        assert same != (model_type in INDEX_DEPENDENT)
        # three Apollo steps through the training loop (1 -> 2 -> 4 live layers)
        cfg = RunConfig(model=m, method=MethodConfig("apollo", stages=(1, 2, 4), switch=(1, 2), switch_unit="step"),
                        train=TrainConfig(batch_size=4, steps=3, eval_every=3, eval_blocks=4, threads=1,
                                          progress=False),
                        data=DataConfig(synthetic_sentences=300), out=str(tmp_path / "run"))
        key = "masked" if mlm else "causal"
        if key not in data:
            data[key] = load_lm_data(cfg.data, m, 0)
        summary = train(cfg, data=data[key])
        assert summary["layers"] == 4 and summary["flops"] > 0 and summary["final_val_loss"] == summary[
            "final_val_loss"]
    except ApolloError as e:
        message = str(e)
        assert "\n" not in message and message
        return f"refused: {message}"
    if model_type in INDEX_DEPENDENT:
        return f"grows, but a reload differs: {INDEX_DEPENDENT[model_type]}"
    if not found:
        return "grows by copies; its branch outputs are not linear layers apollo finds, so no zeroed growth"
    return ("grows; zeroed copies keep the function" if identity else
            "grows; a zeroed layer is not the identity (post-LN or an unfound branch), so zeroed copies change it")


@pytest.fixture(scope="module")
def shared_data():
    return {}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_architecture(model_type, tmp_path, shared_data, capsys):
    hf_logging.set_verbosity_error()
    result = check(model_type, tmp_path, shared_data)
    with capsys.disabled():
        print(f"\n{model_type}: {result}", end="")


def test_the_sweep_covers_the_library():
    """At least 30 architectures come from the mappings, and the registered ones are among them."""
    assert len(MODEL_TYPES) >= 30 and set(ADAPTERS) <= set(MODEL_TYPES)


if __name__ == "__main__":  # docs/architectures.md's table
    sys.exit(pytest.main([__file__, "-q", "-rs", "-p", "no:cacheprovider"]))


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_inspection_finds_what_every_registered_entry_says(model_type, tmp_path):
    """ADAPTERS is only an override: inspecting each registered architecture finds the same layer list, depth
    field (or its attribute_map alias), residual-branch outputs and (masked LMs) head."""
    model = build(tiny(model_type, tmp_path), 2)
    registered, found = ADAPTERS[model_type], inspect_adapter(model)
    assert found.layers == registered.layers and found.mlm == registered.mlm
    aliases = getattr(model.config, "attribute_map", {})
    assert registered.depth_field in (found.depth_field, aliases.get(found.depth_field))
    assert found.residual_outputs == registered.residual_outputs
    if registered.mlm:
        assert found.head == registered.head


def test_model_config_from_the_command_line(tmp_path):
    """``apollo train --model-config DIR`` builds that architecture at its own depth and width unless flags say
    otherwise, records arch = its model_type, and a bad path is one line with exit code 2."""
    import json
    import subprocess

    from transformers import Qwen3Config

    Qwen3Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, head_dim=16).save_pretrained(tmp_path / "qwen3")
    flags = ["--vocab", "512", "--seq-len", "16", "--batch-size", "4", "--synthetic-sentences", "300",
             "--eval-blocks", "4", "--no-progress", "--steps", "4", "--eval-every", "4", "--threads", "1"]
    r = subprocess.run([sys.executable, "-m", "apollo", "train", "--model-config", str(tmp_path / "qwen3"),
                        "--method", "apollo", "--stages", "1", "2", "4", "--switch", "1", "2", "--switch-unit",
                        "step", *flags, "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["model_type"] == "qwen3" and saved["num_hidden_layers"] == 4 and saved["hidden_size"] == 32
    assert saved["num_key_value_heads"] == 1 and len(saved["layer_types"]) == 4
    assert "arch: qwen3" in (tmp_path / "run" / "config.yaml").read_text()
    r = subprocess.run([sys.executable, "-m", "apollo", "train", "--model-config", str(tmp_path / "missing"),
                        *flags, "--out", str(tmp_path / "bad")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("apollo: error: --model-config ") and r.stderr.count("\n") == 1
