"""kdtune's processes wait passively in OpenMP (``OMP_WAIT_POLICY=PASSIVE`` unless set).

libgomp reads the variable when torch loads it, so what matters is that importing ``kdtune``
sets it *before* torch is imported: each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, os, sys
import kdtune
print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY"),
                  "torch_loaded": "torch" in sys.modules}))
"""


def run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_kdtune_sets_passive_waits_before_torch_loads():
    result = run(None)
    assert result == {"policy": "PASSIVE", "torch_loaded": False}


def test_the_environment_wins():
    assert run("ACTIVE")["policy"] == "ACTIVE"
