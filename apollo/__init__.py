"""apollo: progressive depth growth for Hugging Face transformers (Apollo, Shi et al., AAAI 2024).

The pieces are usable from your own training loop::

    from apollo import DepthSampler, layer_map, shared_layers, grow, train_flops
    from apollo import bert2bert, LiGO          # growth from a trained smaller model
    from apollo import ApolloTrainer, ApolloConfig  # a transformers.Trainer that grows (imported on first use)
"""

from .baselines.bert2bert import bert2bert
from .baselines.ligo import LiGO
from .config import ApolloError, DataConfig, MethodConfig, ModelConfig, RunConfig, TrainConfig, preset
from .measure.flops import forward_flops, train_flops
from .method.growth import expand_layers, grow, interpolation_map, layer_map, shared_layers, stacking_map
from .method.sampling import DepthSampler, depth_distribution, sample_depths
from .method.schedule import Schedule, resolve_schedule
from .models import build_model, get_layers, set_layers

__all__ = [
    "ApolloConfig", "ApolloError", "ApolloTrainer", "DataConfig", "DepthSampler", "LiGO", "MethodConfig",
    "ModelConfig", "RunConfig", "Schedule", "TrainConfig", "bert2bert", "build_model", "compare",
    "depth_distribution", "expand_layers", "forward_flops", "get_layers", "grow", "interpolation_map",
    "layer_map", "preset", "resolve_schedule", "sample_depths", "set_layers", "shared_layers", "stacking_map",
    "train", "train_flops",
]


def train(*args, **kwargs):
    """Train one run (see apollo.runtime.train.train)."""
    from .runtime.train import train as _train

    return _train(*args, **kwargs)


def compare(*args, **kwargs):
    """Compare methods on one budget (see apollo.compare.compare)."""
    from .compare import compare as _compare

    return _compare(*args, **kwargs)


def __getattr__(name: str):
    """ApolloTrainer / ApolloConfig on first use: importing transformers.Trainer is slow and not needed otherwise."""
    if name in ("ApolloTrainer", "ApolloConfig"):
        from .runtime import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module 'apollo' has no attribute {name!r}")
