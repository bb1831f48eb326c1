"""Shared pytest setup: GPU markers skip cleanly, and the Ray/Redis fixtures are plugins."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures_redis", "tests.fixtures_ray"]


def _num_cuda_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # torch missing or broken CUDA: no GPU tests
        return 0


def pytest_collection_modifyitems(config, items):
    num_gpus = _num_cuda_gpus()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on the device machine")
    skip_multi = pytest.mark.skip(reason="needs >= 2 CUDA GPUs; run on nvidia-h100-x2/x4")
    skip_multi4 = pytest.mark.skip(reason="needs >= 4 CUDA GPUs; run on nvidia-h100-x4")
    for item in items:
        # Markers, not keywords: the folder name tests/gpu is a keyword of every test in it.
        if item.get_closest_marker("multigpu4") and num_gpus < 4:
            item.add_marker(skip_multi4)
        elif item.get_closest_marker("multigpu") and num_gpus < 2:
            item.add_marker(skip_multi)
        elif item.get_closest_marker("gpu") and num_gpus < 1:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llm():
    """The built-in kvmesh-tiny model in an offline LLM, shared by the session."""
    from engine import LLM
    return LLM(model="kvmesh-tiny")
