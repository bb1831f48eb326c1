"""engine/gc_freeze.py: the start-up heap frozen and the serving collector thresholds (each case in
a fresh interpreter: both are process-wide)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import gc; from engine.gc_freeze import freeze_startup_heap; before = gc.get_threshold(); "
         "freeze_startup_heap(); print(before, gc.get_threshold(), gc.get_freeze_count() > 0, sep='|')")


def probe(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("KVMESH_GC")}, **env})


@pytest.mark.parametrize("env, thresholds, frozen", [
    ({}, (20000, 20, 50), True),
    ({"KVMESH_GC_THRESHOLDS": "5000,10,10"}, (5000, 10, 10), True),
    ({"KVMESH_GC_THRESHOLDS": "0"}, None, True),  # None: Python's own, untouched
    ({"KVMESH_GC_FREEZE": "0"}, None, False),  # all off
])
def test_freeze_and_thresholds(env, thresholds, frozen):
    res = probe(**env)
    assert res.returncode == 0, res.stderr
    before, after, was_frozen = res.stdout.strip().split("|")
    assert after == str(thresholds or ast.literal_eval(before)) and was_frozen == str(frozen)


@pytest.mark.parametrize("raw", ["1,2", "a,b,c", "100,0,5"])
def test_bad_thresholds_fail_with_the_variable_named(raw):
    res = probe(KVMESH_GC_THRESHOLDS=raw)
    assert res.returncode != 0 and "KVMESH_GC_THRESHOLDS must be three positive integers" in res.stderr
