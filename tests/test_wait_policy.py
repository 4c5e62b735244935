"""``import gradfix`` asks OpenMP for passive waiting before torch loads, keeping a user's choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "import os, gradfix, sys; print(os.environ.get('OMP_WAIT_POLICY')); print('torch' in sys.modules)"


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_import_sets_passive_wait_unless_chosen(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    policy, torch_loaded = done.stdout.split()
    assert policy == expected
    assert torch_loaded == "True"  # the policy was set although importing gradfix loads torch


def test_pytorchs_openmp_runtime_reads_the_passive_policy() -> None:
    """libgomp prints the settings it read when it starts (``OMP_DISPLAY_ENV``): loaded by torch
    through ``import gradfix``, it must have read the passive policy."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "TRUE"
    done = subprocess.run([sys.executable, "-c", "import gradfix"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    if "OMP_WAIT_POLICY" not in done.stderr:
        pytest.skip("this OpenMP runtime does not display its settings")
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in done.stderr
