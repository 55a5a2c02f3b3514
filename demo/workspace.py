"""The demo's folder: task, tokenizer, data, the shipped teacher and the students' initial weights.

Layout under a root folder (``kdtune demo --out DIR`` makes it; the demo configs point at it
through their ``demo_dir`` key)::

    task.json                         the chain (words and transition rows), see kdtune.demo.task
    tokenizer/tokenizer.model         tiktoken ranks with one token per word
    tokenizer/special_tokens.json
    data/train.json                   the student's small fine-tuning set (alpaca records)
    data/val.json                     held-out records, for evaluation only
    teacher/{config.json,model.safetensors}        copy of the shipped teacher (kdtune/demo/teacher)
    students/init_seed{S}/{config.json,model.safetensors}   the student before training, seed S
    manifest.json                     written last; a folder is reused when it matches

Everything is deterministic: the same :class:`TaskSpec` gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kdtune.assets.checkpoints import write_hf_checkpoint, write_text_atomic
from kdtune.assets.data import records_json
from kdtune.demo.models import DEMO_VOCAB_SIZE, STUDENT_DIMS
from kdtune.demo.task import ChainTask, make_task, sample_records
from kdtune.demo.tokenizer import special_token_ids, tokenizer_sha256, write_demo_tokenizer

SHIPPED_TEACHER_DIR = Path(__file__).resolve().parent / "teacher"
TEACHER_MANIFEST_FILE = "manifest.json"  # inside the shipped teacher folder
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    """Everything that defines the demo's data. The shipped teacher was trained on this spec."""

    task_seed: int = 0
    num_words: int = 48
    min_successors: int = 4
    max_successors: int = 8
    min_end_prob: float = 0.1
    max_end_prob: float = 0.3
    dirichlet_alpha: float = 1.0
    num_train: int = 128  # the student's fine-tuning set: small on purpose
    num_val: int = 1000
    num_teacher_train: int = 20_000  # the teacher's corpus (kdtune.demo.train_teacher)
    train_seed: int = 1
    val_seed: int = 2
    teacher_train_seed: int = 3

    def make_task(self) -> ChainTask:
        return make_task(
            seed=self.task_seed,
            num_words=self.num_words,
            min_successors=self.min_successors,
            max_successors=self.max_successors,
            min_end_prob=self.min_end_prob,
            max_end_prob=self.max_end_prob,
            dirichlet_alpha=self.dirichlet_alpha,
        )


DEFAULT_SPEC = TaskSpec()


@dataclass(frozen=True)
class Workspace:
    """Paths of one demo folder (the fixed layout; see the module docstring)."""

    root: Path

    @property
    def task_path(self) -> Path:
        return self.root / "task.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.json"

    @property
    def val_data(self) -> Path:
        return self.root / "data" / "val.json"

    @property
    def teacher_train_data(self) -> Path:
        return self.root / "data" / "teacher_train.json"

    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    def student_init_dir(self, seed: int) -> Path:
        return self.root / "students" / f"init_seed{seed}"

    def run_dir(self, seed: int, name: str) -> Path:
        return self.root / "runs" / f"seed{seed}" / name

    def load_task(self) -> ChainTask:
        return ChainTask.load(self.task_path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_teacher_manifest(teacher_dir: Path = SHIPPED_TEACHER_DIR) -> dict:
    """The shipped teacher's manifest: spec, tokenizer hash, command and measured quality."""
    manifest = _read_json(teacher_dir / TEACHER_MANIFEST_FILE)
    if manifest is None:
        raise ValueError(
            f"no teacher manifest at {teacher_dir / TEACHER_MANIFEST_FILE}; train the teacher "
            "with `python -m kdtune.demo.train_teacher` (see its docstring)"
        )
    return manifest


def check_teacher_matches(spec: TaskSpec, teacher_dir: Path = SHIPPED_TEACHER_DIR) -> None:
    """``ValueError`` unless the teacher in ``teacher_dir`` was trained on ``spec``'s task."""
    manifest = read_teacher_manifest(teacher_dir)
    if manifest["spec"] != asdict(spec):
        raise ValueError(
            f"the teacher in {teacher_dir} was trained on spec {manifest['spec']}, not "
            f"{asdict(spec)}; retrain it with `python -m kdtune.demo.train_teacher`"
        )
    if manifest["tokenizer_sha256"] != tokenizer_sha256(spec.make_task()):
        raise ValueError(f"the teacher in {teacher_dir} was trained with another tokenizer")


def write_student_init(out_dir: Path, seed: int, spec: TaskSpec) -> list[Path]:
    """The student's initial weights for ``seed`` (HF format, fp32), drawn by kdtune.assets."""
    specials = special_token_ids(_num_ranks(spec))
    return write_hf_checkpoint(
        out_dir,
        STUDENT_DIMS,
        vocab_size=DEMO_VOCAB_SIZE,
        seed=seed,
        bos_token_id=specials["<|begin_of_text|>"],
        eos_token_id=specials["<|end_of_text|>"],
    )


def _num_ranks(spec: TaskSpec) -> int:
    from kdtune.demo.tokenizer import demo_ranks

    return len(demo_ranks(spec.make_task()))


def write_task_files(ws: Workspace, spec: TaskSpec, *, teacher_corpus: bool) -> list[Path]:
    """Task, tokenizer and data files (the teacher's corpus only when asked); returns paths."""
    task = spec.make_task()
    ws.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ws.task_path, json.dumps(task.to_json(), indent=1) + "\n")
    files = write_demo_tokenizer(task, ws.tokenizer_dir)
    ws.train_data.parent.mkdir(parents=True, exist_ok=True)
    splits = [
        (ws.train_data, spec.num_train, spec.train_seed),
        (ws.val_data, spec.num_val, spec.val_seed),
    ]
    if teacher_corpus:
        splits.append((ws.teacher_train_data, spec.num_teacher_train, spec.teacher_train_seed))
    for path, count, seed in splits:
        write_text_atomic(path, records_json(sample_records(task, count, seed=seed)))
    return [
        ws.task_path,
        files.tokenizer_path,
        files.special_tokens_path,
        *(p for p, _, _ in splits),
    ]


def _complete(root: Path, files: dict[str, int]) -> bool:
    return bool(files) and all(
        (root / name).is_file() and (root / name).stat().st_size == size
        for name, size in files.items()
    )


def _write_manifest(ws: Workspace, manifest: dict) -> None:
    write_text_atomic(ws.root / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def prepare_workspace(
    root: str | Path, *, seeds: list[int], spec: TaskSpec = DEFAULT_SPEC
) -> tuple[Workspace, bool]:
    """Create (or reuse) the demo folder with initial students for ``seeds``.

    Returns the folder and whether its task files were reused: they are when the manifest
    records the same spec and shipped-teacher hash and every file has its recorded size;
    otherwise everything is rewritten (a few seconds). Initial students of seeds not there yet
    are added either way.
    """
    ws = Workspace(Path(root))
    check_teacher_matches(spec)
    wanted = {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "teacher_sha256": _sha256(SHIPPED_TEACHER_DIR / "model.safetensors"),
    }
    manifest = _read_json(ws.root / MANIFEST_FILE)
    reused = (
        manifest is not None
        and {key: manifest.get(key) for key in wanted} == wanted
        and _complete(ws.root, manifest.get("files", {}))
    )
    if not reused:
        (ws.root / MANIFEST_FILE).unlink(missing_ok=True)
        written = write_task_files(ws, spec, teacher_corpus=False)
        ws.teacher_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted(SHIPPED_TEACHER_DIR.iterdir()):
            if source.is_file():
                shutil.copyfile(source, ws.teacher_dir / source.name)
                written.append(ws.teacher_dir / source.name)
        manifest = {**wanted, "files": _sizes(ws, written), "students": {}}
    for seed in seeds:
        if not _complete(ws.root, manifest["students"].get(str(seed), {})):
            files = write_student_init(ws.student_init_dir(seed), seed, spec)
            manifest["students"][str(seed)] = _sizes(ws, files)
    _write_manifest(ws, manifest)
    return ws, reused


def _sizes(ws: Workspace, paths: list[Path]) -> dict[str, int]:
    return {p.relative_to(ws.root).as_posix(): p.stat().st_size for p in paths}
