"""Train the demo's teacher with kdtune's own recipe, score it, and (optionally) ship it.

The shipped teacher (``kdtune/demo/teacher/``: ``config.json``, ``model.safetensors``,
``manifest.json``) was made by::

    python -m kdtune.demo.train_teacher --out ./kdtune_demo_teacher --ship

which (1) writes the task, tokenizer and a 20,000-answer corpus (:class:`TaskSpec`) and a
random initial teacher into ``--out``, (2) runs ``kdtune run knowledge_distillation --config
demo/teacher assets_dir=<out>`` in this process (CE only, no teacher of its own), (3) scores
the result on the held-out answers against the true chain, and with ``--ship`` (4) copies the
weights into the package with a manifest recording the task spec, the tokenizer's hash, the
command and the scores. It takes about 10 minutes on 2 CPU cores (1,248 steps). The run is
seeded and deterministic; on another CPU or thread count the weights may differ in the last
bits, with the same quality. Trailing ``key=value`` arguments override the teacher config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from kdtune.assets.checkpoints import write_hf_checkpoint, write_text_atomic
from kdtune.demo.evaluate import evaluate_checkpoints
from kdtune.demo.models import DEMO_VOCAB_SIZE, TEACHER_DIMS
from kdtune.demo.runner import demo_config, run_recipe
from kdtune.demo.table import json_safe
from kdtune.demo.tokenizer import demo_ranks, special_token_ids, tokenizer_sha256
from kdtune.demo.workspace import (
    DEFAULT_SPEC,
    SHIPPED_TEACHER_DIR,
    TEACHER_MANIFEST_FILE,
    TaskSpec,
    Workspace,
    write_task_files,
)

TEACHER_CONFIG = "demo/teacher"
TEACHER_INIT_SEED = 1000
COMMAND = "python -m kdtune.demo.train_teacher --out ./kdtune_demo_teacher --ship"


def setup_teacher_workspace(root: Path, spec: TaskSpec) -> Workspace:
    """Task, tokenizer, data (with the teacher's corpus) and the random initial teacher."""
    ws = Workspace(root)
    write_task_files(ws, spec, teacher_corpus=True)
    specials = special_token_ids(len(demo_ranks(spec.make_task())))
    write_hf_checkpoint(
        ws.root / "teacher_init",
        TEACHER_DIMS,
        vocab_size=DEMO_VOCAB_SIZE,
        seed=TEACHER_INIT_SEED,
        bos_token_id=specials["<|begin_of_text|>"],
        eos_token_id=specials["<|end_of_text|>"],
    )
    return ws


def ship_teacher(checkpoint: Path, metrics: dict, spec: TaskSpec, steps: int) -> None:
    """Copy the trained weights into ``kdtune/demo/teacher`` with their manifest."""
    SHIPPED_TEACHER_DIR.mkdir(parents=True, exist_ok=True)
    shards = sorted(checkpoint.glob("model-*.safetensors"))
    if len(shards) != 1:
        raise ValueError(f"expected one weight shard in {checkpoint}, found {shards}")
    shutil.copyfile(shards[0], SHIPPED_TEACHER_DIR / "model.safetensors")
    shutil.copyfile(checkpoint / "config.json", SHIPPED_TEACHER_DIR / "config.json")
    manifest = {
        "command": COMMAND,
        "config": TEACHER_CONFIG,
        "spec": asdict(spec),
        "tokenizer_sha256": tokenizer_sha256(spec.make_task()),
        "init_seed": TEACHER_INIT_SEED,
        "steps": steps,
        "torch_version": torch.__version__,
        "weights_sha256": hashlib.sha256(
            (SHIPPED_TEACHER_DIR / "model.safetensors").read_bytes()
        ).hexdigest(),
        "held_out_metrics": json_safe(metrics),
    }
    write_text_atomic(
        SHIPPED_TEACHER_DIR / TEACHER_MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdtune.demo.train_teacher", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("./kdtune_demo_teacher"))
    parser.add_argument("--setup-only", action="store_true", help="write the folder, no training")
    parser.add_argument("--ship", action="store_true", help=f"copy into {SHIPPED_TEACHER_DIR}")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (the shipped teacher used 1)"
    )
    args, overrides = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    spec = DEFAULT_SPEC
    ws = setup_teacher_workspace(args.out, spec)
    print(f"teacher folder ready: {ws.root}")
    if args.setup_only:
        return 0
    cfg = demo_config(TEACHER_CONFIG, [f"assets_dir={ws.root}", *overrides])
    result = run_recipe(cfg, fresh=True, quiet=False)
    print(f"trained {result.steps} steps in {result.seconds:.0f} s -> {result.checkpoint}")
    # Score with the student config's builders: its teacher_model is this model.
    eval_cfg = demo_config("demo/student_kd", [f"assets_dir={ws.root}"])
    rows = evaluate_checkpoints(eval_cfg, {}, teacher=result.checkpoint)
    metrics = {"teacher": rows["teacher"], "truth": rows["truth"]}
    print(json.dumps(metrics, indent=1))
    if args.ship:
        ship_teacher(result.checkpoint, metrics, spec, result.steps)
        print(f"shipped to {SHIPPED_TEACHER_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
