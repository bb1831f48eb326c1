"""KVMESH_L2_PREFETCH's parsing and where no prefetch is asked for (engine/kernels/l2_prefetch.py).

The prefetch itself runs on Hopper only: tests/gpu/test_kernels.py checks it changes no
result, and bench/ll_allreduce.py checks the LL all-reduce with it."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import l2_prefetch
from engine.kernels.l2_prefetch import DEFAULT_MB, Site, nbytes, parse


def test_unset_means_the_defaults_and_zero_turns_every_site_off():
    assert parse(None) == DEFAULT_MB and parse("") == DEFAULT_MB
    assert parse("0") == {site: 0 for site in Site} == parse("off")


def test_named_sites_take_their_size_and_the_others_none():
    assert parse("norm=24,attn=8") == {Site.NORM: 24, Site.ATTN: 8, Site.MLP: 0}
    assert parse(" MLP=4 ") == {Site.NORM: 0, Site.ATTN: 0, Site.MLP: 4}


@pytest.mark.parametrize("value", ["norm", "norm=x", "lm_head=4", "norm=-1", "1"])
def test_bad_values_name_the_variable_and_the_sites(value):
    with pytest.raises(ValueError, match="KVMESH_L2_PREFETCH") as err:
        parse(value)
    assert "norm" in str(err.value)


def test_no_prefetch_off_cuda_or_without_a_weight(monkeypatch):
    monkeypatch.setattr(l2_prefetch, "MEGABYTES", {site: 16 for site in Site})
    assert nbytes(Site.NORM, None, 1) == 0
    assert nbytes(Site.NORM, torch.zeros(64, 64), 1) == 0
