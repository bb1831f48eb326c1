"""Builds a model for one rank and fills its weights.

    1. build on the meta device (no memory), cast to the target dtype (free on meta)
    2. materialise empty on the target device: each tensor allocated once, in its final dtype
    3. fill: LoadFormat.DUMMY -> seeded random values, no files read
             otherwise       -> stream the safetensors files tensor by tensor; each layer's
                                ``weight_loader`` copies its rank's slice, so a rank never holds
                                more than one full checkpoint tensor besides its own shard

Files: ``model.safetensors.index.json`` (sharded checkpoint) if present, else
``model.safetensors``, else any ``*.safetensors`` in the folder.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from torch import nn

from engine.config import LoadFormat
from engine.models.layers import Communicator, RMSNorm
from engine.models.registry import get_model_class
from engine.models.spec import ModelSpec

logger = logging.getLogger(__name__)

DUMMY_WEIGHT_STD = 0.02  # small, so dummy activations stay finite through many layers


def load_model(model_path: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
               load_format: LoadFormat, seed: int, tp_rank: int = 0, tp_size: int = 1,
               comm: Optional[Communicator] = None, pp_rank: int = 0, pp_size: int = 1,
               ep_rank: int = 0, ep_size: int = 1) -> nn.Module:
    """Returns the model of one rank in eval mode, weights on ``device`` in ``dtype``: its TP
    shard of pipeline stage ``pp_rank``'s layers, with its EP share of the experts."""
    load_format = LoadFormat(load_format)
    device = torch.device(device)
    files = [] if load_format == LoadFormat.DUMMY else safetensors_files(model_path)
    start = time.monotonic()
    model_cls = get_model_class(spec.architecture)
    with torch.device("meta"):
        model = model_cls(spec, tp_rank=tp_rank, tp_size=tp_size, comm=comm,
                          pp_rank=pp_rank, pp_size=pp_size, ep_rank=ep_rank, ep_size=ep_size)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty makes new tensors, which unties shared parameters
    if load_format == LoadFormat.DUMMY:
        init_dummy_weights(model, seed)
    else:
        model.load_weights(iter_safetensors(files))
    model.requires_grad_(False).eval()
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("loaded %s (%s, tp %d/%d, pp %d/%d, ep %d/%d): %.1fM parameters, %s on %s in %.1fs",
                spec.architecture.value, load_format.value, tp_rank, tp_size, pp_rank, pp_size,
                ep_rank, ep_size, num_params / 1e6,
                str(dtype).removeprefix("torch."), device, time.monotonic() - start)
    return model


def safetensors_files(model_path: str) -> list[str]:
    """The checkpoint's weight files in load order; clear errors if there are none."""
    if not os.path.isdir(model_path):
        raise ValueError(f"model folder {model_path!r} does not exist or is not a directory")
    index_path = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"malformed {index_path}: {e!r}") from None
        files = [os.path.join(model_path, name) for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{index_path} lists shard files that do not exist: {missing}")
        return files
    single = os.path.join(model_path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        present = sorted(os.listdir(model_path))
        raise ValueError(f"no *.safetensors weight files in {model_path!r} (found {present}); "
                         f"convert the checkpoint to safetensors or use load_format='dummy'")
    return files


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor on CPU) one tensor at a time, file by file."""
    for i, path in enumerate(files):
        logger.info("loading shard %d/%d: %s", i + 1, len(files), os.path.basename(path))
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, std: float = DUMMY_WEIGHT_STD) -> None:
    """Norm weights 1, everything else N(0, std), from a generator seeded by ``seed``."""
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    generator: Optional[torch.Generator] = None
    for param in model.parameters():
        if generator is None:
            generator = torch.Generator(device=param.device).manual_seed(seed)
        if id(param) in norm_weights:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
