"""kdtune's processes spin briefly in OpenMP waits (``GOMP_SPINCOUNT=10000`` unless set).

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
print(json.dumps({"spins": os.environ.get("GOMP_SPINCOUNT"),
                  "torch_loaded": "torch" in sys.modules}))
"""


def run(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if env_value is not None:
        env["GOMP_SPINCOUNT"] = env_value
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_kdtune_sets_short_spins_before_torch_loads():
    assert run(None) == {"spins": "10000", "torch_loaded": False}


def test_the_environment_wins():
    assert run("300000")["spins"] == "300000"
