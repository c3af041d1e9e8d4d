"""Multiple-choice questions: the paper's JSONL format, the hub benchmarks, subsampling, MMAC.

Every question becomes the paper's prompt (``Question: ...\\nOptions:\\nA: ...`` then the reply
instruction) with a label in A–D, whatever its source, so the rest of the pipeline sees one shape.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .options import option
from .outputs import atomic_write

__all__ = [
    "LETTERS", "REPLY_INSTRUCTION", "BENCHMARKS", "DataError", "MCQuestion", "format_prompt",
    "QuestionSource", "read_jsonl", "write_jsonl", "subsample", "sample_n", "split_in_half", "load_benchmark", "load_mmac",
]

LETTERS = ("A", "B", "C", "D")
REPLY_INSTRUCTION = "Please reply with only A, B, C, or D. Do not provide any explanation."


class DataError(ValueError):
    """A question that cannot be used, with where it came from."""


@dataclass(frozen=True)
class MCQuestion:
    """One 4-option question as the model sees it: the full prompt text and the label letter."""

    prompt: str
    label: str
    source: str = ""  # where it came from ("file.jsonl:12", "cais/mmlu[test]#3"), for error messages

    def __post_init__(self):
        where = f" ({self.source})" if self.source else ""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DataError(f"empty question{where}")
        if self.label not in LETTERS:
            raise DataError(f"label {self.label!r} is not one of A, B, C, D{where}")


def format_prompt(question: str, options) -> str:
    """The paper's prompt for a question and its 4 options (in A–D order)."""
    options = list(options)
    if len(options) != len(LETTERS):
        raise DataError(f"expected 4 options, got {len(options)}")
    lines = "".join(f"{letter}: {str(text).strip()}\n" for letter, text in zip(LETTERS, options))
    return f"Question: {question.strip()}\nOptions:\n{lines}\n{REPLY_INSTRUCTION}"


# ---------------------------------------------------------------------------------- JSONL files

def read_jsonl(path) -> list[MCQuestion]:
    """Read the paper's JSONL (``{"label", "question", "predict_label"?}`` a line); errors name file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    questions = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {error.object[error.start]:#04x}); "
                        "save the file as UTF-8") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "label" not in row or row["label"] in (None, ""):
            raise DataError(f"{where}: missing label: each line needs a \"label\" field with the answer's letter "
                            f"(A, B, C or D); this line has {sorted(row)}")
        if "question" not in row:
            raise DataError(f"{where}: missing question: each line needs a \"question\" field with the prompt; "
                            f"this line has {sorted(row)}")
        questions.append(MCQuestion(row["question"], row["label"], where))
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def write_jsonl(path, questions, predictions=None) -> None:
    """Write questions in the paper's format (``predict_label`` when predictions are given)."""
    if predictions is not None and len(predictions) != len(questions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    with atomic_write(path) as out:
        for i, q in enumerate(questions):
            row = {"label": q.label, "question": q.prompt}
            if predictions is not None:
                row["predict_label"] = predictions[i]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------- sampling

def subsample(items, fraction: float, seed: int) -> list:
    """A seeded random ``fraction`` of ``items``, kept in their original order."""
    items = list(items)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), round(len(items) * fraction)))
    return [items[i] for i in keep]


def sample_n(items, n: int | None, seed: int) -> list:
    """At most ``n`` seeded random items (all of them when ``n`` is None), kept in order."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


def split_in_half(items, seed: int) -> tuple[list, list]:
    """The paper's 1:1 split: a seeded shuffle cut in two (the first half gets the odd one)."""
    items = list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = (len(items) + 1) // 2
    return [items[i] for i in sorted(order[:cut])], [items[i] for i in sorted(order[cut:])]


# ---------------------------------------------------------------------------------- hub benchmarks

def _mmlu_row(row):
    answer = int(row["answer"])
    if not 0 <= answer < len(LETTERS):  # a negative index would silently pick D
        raise DataError(f"answer {row['answer']!r} is not an option index 0-3")
    return row["question"], row["choices"], LETTERS[answer]


def _keyed_choices_row(row):
    """ARC and CommonsenseQA: ``choices = {"label": [...], "text": [...]}`` and ``answerKey``.

    ARC labels some questions 1–4 instead of A–D; CommonsenseQA has 5 options (A–E). The paper's
    prompt has 4, so the answer is kept with the first three distractors, in their original order.
    """
    keys = [str(k).strip() for k in row["choices"]["label"]]
    texts = list(row["choices"]["text"])
    answer = str(row["answerKey"]).strip()
    if answer not in keys:
        raise DataError(f"answerKey {answer!r} is not among the choice labels {keys}")
    if len(keys) < 4:
        raise DataError(f"only {len(keys)} options; 4 are needed")
    correct = keys.index(answer)
    kept = sorted([correct] + [i for i in range(len(keys)) if i != correct][:3])
    return row["question"], [texts[i] for i in kept], LETTERS[kept.index(correct)]


def _medqa_row(row):
    options = row["options"]
    return row["question"], [options[letter] for letter in LETTERS], row["answer_idx"]


@dataclass(frozen=True)
class Benchmark:
    """A hub dataset, the labeled splits the paper pools, its default subsampling and row layout."""

    hub_id: str
    config: str | None
    splits: tuple[str, ...]
    fraction: float
    convert: object  # row -> (question, 4 options, label letter)


# Pooling all labeled splits and then subsampling reproduces the sizes of the authors' files
# (MMLU 15,573/10 ≈ 1,555; CSQA 10,962/10 = 1,096; ARC-C 2,590/2 ≈ 1,270 after 4-option filtering).
BENCHMARKS = {
    "mmlu": Benchmark("cais/mmlu", "all", ("test", "validation"), 0.1, _mmlu_row),
    "arc_c": Benchmark("allenai/ai2_arc", "ARC-Challenge", ("train", "validation", "test"), 0.5, _keyed_choices_row),
    "csqa": Benchmark("tau/commonsense_qa", None, ("train", "validation"), 0.1, _keyed_choices_row),
    "medqa": Benchmark("GBaker/MedQA-USMLE-4-options", None, ("train", "test"), 0.1, _medqa_row),
}
MMAC_PARTS = ("mmlu", "medqa", "arc_c", "csqa")  # MMAC: MMLU + MedQA + ARC-C + CSQA


def _load_splits(benchmark: Benchmark, data_files):
    """``{split name: rows}`` from the hub, or from local JSON/JSONL/Parquet/CSV files in its layout."""
    try:  # imported here: datasets takes 1.7 s to import (-X importtime), and only these commands need it
        import datasets
    except ImportError as exc:
        raise ImportError(f"loading {benchmark.hub_id} needs the datasets package: pip install datasets") from exc

    if data_files is None:
        loaded = datasets.load_dataset(benchmark.hub_id, benchmark.config)
        missing = [s for s in benchmark.splits if s not in loaded]
        if missing:
            raise DataError(f"{benchmark.hub_id}: splits {missing} not found (has {list(loaded)})")
        return {s: loaded[s] for s in benchmark.splits}
    files = data_files if isinstance(data_files, dict) else {"train": data_files}
    first = next(iter(files.values()))
    first = first[0] if isinstance(first, (list, tuple)) else first
    suffix = Path(str(first)).suffix.lower()
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
    if builder is None:
        raise DataError(f"{first}: cannot tell the format from the suffix {suffix!r} (json, jsonl, parquet, csv)")
    try:
        return dict(datasets.load_dataset(builder, data_files=files))
    except Exception as error:  # noqa: BLE001 - name the files whatever the reader's complaint
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{', '.join(map(str, files.values()))}: cannot read as {builder} "
                        f"({type(error).__name__}: {first_line})") from None


def load_benchmark(name: str, *, data_files=None, fraction: float | None = None, seed: int = 0) -> list[MCQuestion]:
    """Load a benchmark (``mmlu``, ``arc_c``, ``csqa``, ``medqa`` or ``mmac``) as paper-format questions.

    ``data_files``: local files in the hub dataset's column layout instead of the hub (a path, a
    list, or ``{split: path}``). ``fraction``: the subsampling (default: the paper's for that
    benchmark); ``seed`` fixes which questions are kept.
    """
    if name == "mmac":
        if data_files is not None:
            raise ValueError("mmac is the union of the hub benchmarks; pass per-benchmark files to load_mmac")
        return load_mmac(fraction=fraction, seed=seed)
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS) + ['mmac']}")
    benchmark = BENCHMARKS[name]
    questions = []
    for split, rows in _load_splits(benchmark, data_files).items():
        for index, row in enumerate(rows):
            where = f"{name} {benchmark.hub_id}[{split}] row {index}"
            try:
                question, options, label = benchmark.convert(row)
                if not isinstance(question, str) or not question.strip():
                    raise DataError("empty question")
                prompt = format_prompt(question, options)
            except DataError as error:
                raise DataError(f"{where}: {error}") from None
            except (KeyError, TypeError, IndexError, ValueError) as error:
                raise DataError(f"{where}: malformed row ({type(error).__name__}: {error})") from None
            questions.append(MCQuestion(prompt, label, where))  # checks the label, naming the row
    return subsample(questions, benchmark.fraction if fraction is None else fraction, seed)


def load_mmac(*, data_files: dict | None = None, fraction: float | None = None, seed: int = 0) -> list[MCQuestion]:
    """MMAC: the union of MMLU, MedQA, ARC-C and CSQA, each subsampled as on its own.

    ``data_files``: optional ``{benchmark name: files}`` for local copies.
    """
    data_files = data_files or {}
    unknown = set(data_files) - set(MMAC_PARTS)
    if unknown:
        raise ValueError(f"load_mmac: unknown benchmarks {sorted(unknown)}; MMAC is {MMAC_PARTS}")
    union = []
    for part in MMAC_PARTS:
        union += load_benchmark(part, data_files=data_files.get(part), fraction=fraction, seed=seed)
    return union


@dataclass
class QuestionSource:
    """Questions: paper-format JSONL files or a benchmark."""

    data: tuple[Path, ...] = option((), "paper-format JSONL files (joined); or use --dataset", metavar="FILE")
    dataset: str | None = option(None, "a benchmark, from the hub or --data-files; or use --data",
                                 choices=(*BENCHMARKS, "mmac"))
    data_files: tuple[str, ...] = option((), "with --dataset: local files in the hub dataset's layout", metavar="FILE")
    fraction: float | None = option(None, "with --dataset: keep this fraction (default: the paper's for it)")
    limit: int | None = option(None, "keep at most this many questions (a seeded sample)")
    seed: int = option(0, "seed of --fraction and --limit sampling (and of teach's choice of questions)")

    def __post_init__(self):
        if bool(self.data) == bool(self.dataset):
            raise ValueError("give the questions with --data FILE... or with --dataset NAME (one of the two)")
        if self.data_files and not self.dataset:
            raise ValueError("--data-files goes with --dataset (the files of that benchmark)")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        for path in self.data:
            if not Path(path).is_file():
                raise DataError(f"--data {path}: no such file")

    def load(self) -> list[MCQuestion]:
        if self.data:
            questions = [q for path in self.data for q in read_jsonl(path)]
        else:
            files = list(self.data_files) or None
            files = files[0] if files and len(files) == 1 else files
            questions = load_benchmark(self.dataset, data_files=files, fraction=self.fraction, seed=self.seed)
        return sample_n(questions, self.limit, self.seed)
