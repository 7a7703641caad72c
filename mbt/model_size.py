"""An MBT's size before it is built, and the one way a model is rebuilt from a file's weights.

A model config is a few numbers that can ask for terabytes (`--model.embed_dim 8192 --model.depth 128
--model.mlp_ratio 16` is 618 billion parameters, every one within its own bound). So nothing builds a model from a
file's config before `fit_problems`: the model's parameter names and shapes are taken from a build on the meta
device (no memory), their count bounded by MAX_MODEL_PARAMS, and the shapes matched to the tensors the file holds
(`check_fit`: a safetensors header's shapes, before the file is read); `build_fitted` allocates only then. The
file's tensors themselves are bounded by the file (`shards.bounded`) and, for torch's pickles, by
`unstored_problems`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType

import torch

from mbt.model import MBT, MBTConfig

# The paper's and scenic's MBT has ViT-B/16 towers (172 million parameters); the largest real one, ViT-L/16 towers,
# 607 million (`param_shapes(MBTConfig(embed_dim=1024, depth=24, num_heads=16))`, 2.4 GB of float32). Four times
# that leaves room for ViT-H towers (1.27 billion) and longer inputs, and bounds what a file's config may make this
# process allocate to 10 GB.
MAX_MODEL_PARAMS = 2_500_000_000
# A file of one MBT: its float32 weights, AdamW's two moments of the same size in a training checkpoint, and room.
MAX_MODEL_FILE_BYTES = 16 * MAX_MODEL_PARAMS


class ModelFitError(ValueError):
    """A model config that is too large, or weights that are not its model's; the message lists what differs."""


@lru_cache(maxsize=16)
def param_shapes(cfg: MBTConfig) -> Mapping[str, tuple[int, ...]]:
    """{name: shape} of every tensor of MBT(cfg)'s state dict, from a build on the meta device: no memory is
    allocated, whatever the sizes (a build of the largest config the bounds allow takes about 1.5 s)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # num_classes 0: the split's, later
        model = MBT(cfg)
    return MappingProxyType({name: tuple(t.shape) for name, t in model.state_dict().items()})


def size_problems(cfg: MBTConfig) -> list[str]:
    """A problem when MBT(cfg) would have more than MAX_MODEL_PARAMS parameters, saying what to lower; none for
    patches larger than their input (no model to count: `mbt.validate.token_problems` names them)."""
    if cfg.patch_size > cfg.img_size or min(cfg.audio_grid) < 1:
        return []
    count = sum(math.prod(shape) for shape in param_shapes(cfg).values())
    if count <= MAX_MODEL_PARAMS:
        return []
    return [
        f"the model would have {count:,} parameters, more than {MAX_MODEL_PARAMS:,} (four MBT-Ls of ViT-L towers): "
        "lower --model.embed_dim, --model.depth or --model.mlp_ratio"
    ]


def fit_problems(cfg: MBTConfig, shapes: Mapping[str, Sequence[int]]) -> list[str]:
    """What keeps tensors of `shapes` ({name: shape}, as a file holds them) from being MBT(cfg)'s weights: the model
    over MAX_MODEL_PARAMS (`size_problems`), else each name missing, unexpected or of another shape. Nothing is
    allocated."""
    if problems := size_problems(cfg):
        return problems
    expected = param_shapes(cfg)
    problems = [f"missing {name}" for name in expected if name not in shapes]
    problems += [f"unexpected {name}" for name in shapes if name not in expected]
    problems += [
        f"{name} has shape {tuple(shapes[name])}, the config's model {shape}"
        for name, shape in expected.items()
        if name in shapes and tuple(shapes[name]) != shape
    ]
    return problems


def check_fit(cfg: MBTConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    """ModelFitError listing the first five `fit_problems` of tensors of `shapes` for MBT(cfg), if there are any."""
    if problems := fit_problems(cfg, shapes):
        raise ModelFitError("; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def build_fitted(cfg: MBTConfig, state: Mapping[str, torch.Tensor]) -> MBT:
    """MBT(cfg) holding the weights `state`, on the CPU, allocated only once they fit (`check_fit`: ModelFitError
    otherwise)."""
    check_fit(cfg, {name: tensor.shape for name, tensor in state.items()})
    model = MBT(cfg)
    model.load_state_dict(state)
    return model


def unstored_problems(state: Mapping[str, torch.Tensor]) -> list[str]:
    """What in the tensors of `state` (as `torch.load` made them) claims more memory than the file stores for them:
    a tensor that is not dense on the CPU (sparse, meta), or views that repeat stored bytes (stride 0) or share
    them, so that their elements take more bytes than their distinct storages hold. Reading every element (a
    finiteness check, a copy into a model) then allocates no more than the file's size."""
    if odd := [name for name, t in state.items() if t.layout != torch.strided or t.device.type != "cpu"]:
        return [f"{', '.join(odd[:5])} not dense tensors on the CPU"]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    claimed = sum(t.numel() * t.element_size() for t in state.values())
    if claimed > sum(storages.values()):
        return [f"its tensors claim {claimed} bytes but the file stores {sum(storages.values())} for them"]
    return []
