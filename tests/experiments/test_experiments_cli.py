"""``python -m cnl_ext`` as a user calls it, on a tiny local model the tests build (no download).

The runs that depend on being a separate process (exit status, what a log file receives, Ctrl-C
and --resume, ``info``) start ``python -m cnl_ext`` as a subprocess; the others call ``main()``
in this process, which is the same code without the interpreter's start-up.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from cnl_ext.cli import build_parser, main  # noqa: E402
from cnl_ext.experiments import make_demo_questions, read_jsonl, write_jsonl  # noqa: E402

from .test_experiments import tiny_model, tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# the subprocesses (cli(), quickstart) load the native CPU kernels, built before their timeouts start
pytestmark = pytest.mark.usefixtures("native_built")
CELL = r"\d+ \(\d+\.\d%\)"  # the paper's "count (percent)"
FAST = ["--eval-batch-size", "8", "--threads", "1"]  # model options
TRAIN = [*FAST, "--backend", "torch"]  # and the optimizer's
DEMO = ["--questions", "16", "--teach-lr", "3e-3", "--teach-epochs", "80", "--epochs", "2", "--lr", "3e-3", *TRAIN]


def cli(*args, env=None, cwd=None):
    """``python -m cnl_ext ARGS`` in a fresh process importing this checkout; stdout/stderr go to pipes (a log)."""
    environment = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    environment.pop("CNL_EXT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "cnl_ext", *map(str, args)], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "questions.jsonl", make_demo_questions(20, seed=5))
    assert main(["infer-and-split", "--data", root / "questions.jsonl", "--model", root / "model",
                 "--out", root / "split", *FAST]) == 0
    return root


def _split(workspace):
    return ["--mastered", workspace / "split" / "mastered.jsonl", "--injection", workspace / "split" / "injection.jsonl"]


def _model(workspace):
    return ["--model", workspace / "model"]


def _rows(path, drop=("wall_s",)):
    with open(path) as rows:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(rows)]


# ---------------------------------------------------------------------------------- the steps work

def test_infer_and_split_records_how_it_was_made(workspace):
    results = json.loads((workspace / "split" / "results.json").read_text())
    mastered = read_jsonl(workspace / "split" / "mastered.jsonl")
    injection = read_jsonl(workspace / "split" / "injection.jsonl")
    assert results["mastered"] == len(mastered) and results["injection"] == len(injection)
    assert len(mastered) + len(injection) == results["questions"] == 20
    assert results["command"].startswith("python -m cnl_ext infer-and-split --data ")
    assert results["versions"]["torch"] and results["versions"]["transformers"] and results["seeds"] == {"--seed": 0}
    weights = (workspace / "model" / "model.safetensors").read_bytes()
    assert results["weights_sha256"] == {"model.safetensors": hashlib.sha256(weights).hexdigest()}
    assert not list(workspace.glob(".*.partial")), "the staging folder was moved into place"


def test_inject_writes_readable_outputs(workspace, capsys):
    out = workspace / "inject"
    assert main(["inject", *_split(workspace), *_model(workspace), "--optimizers", "adamw", "sgd", "--methods", "ft",
                 "cnl", "--epochs", "2", "--lr", "adamw=1e-3", "sgd=0.05", "--out", out, *TRAIN]) == 0
    table = (out / "tables.md").read_text()
    assert len(re.findall(rf"\| (adamw|sgd) \| (FT|CNL) \| {CELL} \| {CELL} \|", table)) == 4
    assert table in capsys.readouterr().out
    summary = _rows(out / "summary.csv")
    assert len(summary) == 4 * 3 and {r["lr"] for r in summary} == {"0.001", "0.05"}
    assert all(r["collaborative_share"] for r in summary if r["method"] == "cnl" and r["epoch"] != "0")
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["adamw FT", "adamw CNL", "sgd FT", "sgd CNL"]
    assert (out / "curves.png").stat().st_size > 1000
    assert {p.name for p in out.iterdir()} == {"summary.csv", "results.json", "tables.md", "curves.png"}


def test_out_of_set_table1_table2(workspace):
    split, model = _split(workspace), _model(workspace)
    out = workspace / "oos"
    assert main(["out-of-set", *split, *model, "--side", "mastered", "--methods", "ft", "replay", "--epochs", "1",
                 "--lr", "1e-3", "--out", out, *TRAIN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["side"] == "mastered" and results["runs"][0]["n_mastered"] == results["unseen_half"]

    assert main(["table1", *split, *model, "--epochs", "1", "--lr", "1e-3", "--out", workspace / "t1", *TRAIN]) == 0
    rows = json.loads((workspace / "t1" / "table1.json").read_text())["rows"]
    assert [r["group"] for r in rows] == ["Sim", "Dissim"] and rows[0]["size"] == rows[1]["size"]

    assert main(["table2", *split, *model, "--out", workspace / "t2", *TRAIN]) == 0
    table2 = json.loads((workspace / "t2" / "results.json").read_text())["table2"]
    assert table2["collaborative"] + table2["conflicting"] == table2["total"] > 0
    assert re.search(r"\| Collaborative \(s ≥ 0\) \| [\d,]+ \| \d+\.\d\d% \|", (workspace / "t2" / "table2.md").read_text())


def test_teach_says_whether_the_margin_was_reached(workspace, capsys):
    out = workspace / "taught"
    assert main(["teach", "--data", workspace / "questions.jsonl", *_model(workspace), "--teach-lr", "3e-3",
                 "--teach-epochs", "2", "--out", out, *TRAIN]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["teach_log"][-1]["epoch"] <= 2
    assert not results["margin_reached"] and "teaching did NOT reach the margin 1" in printed
    assert re.search(r"excluded \d+ = \d+ taught but still answered wrong \+ \d+ not taught but answered right",
                     printed)
    assert main(["infer-and-split", "--data", out / "mastered.jsonl", "--model", out / "model",
                 "--out", out / "resplit", *FAST]) == 0
    # The saved model is the taught one: it still answers its mastered questions.
    assert json.loads((out / "resplit" / "results.json").read_text())["injection"] == 0


def test_prepare_data_and_mmac_from_local_files(workspace):
    pytest.importorskip("datasets")
    import pandas as pd

    rows = [{"question": f"Q{i}?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(20)]
    pd.DataFrame(rows).to_parquet(workspace / "mmlu.parquet")
    out = workspace / "mmlu.jsonl"
    assert main(["prepare-data", "--dataset", "mmlu", "--data-files", workspace / "mmlu.parquet", "--out", out]) == 0
    assert len(read_jsonl(out)) == 2  # the paper's 1/10
    medqa = [{"question": "Q?", "answer": "a", "options": dict(A="a", B="b", C="c", D="d"), "answer_idx": "A"}] * 4
    arc = [{"question": "Q?", "choices": {"text": list("pqrs"), "label": list("ABCD")}, "answerKey": "C"}] * 4
    csqa = [{"question": "Q?", "choices": {"text": list("pqrst"), "label": list("ABCDE")}, "answerKey": "A"}] * 4
    for name, table in (("medqa", medqa), ("arc_c", arc), ("csqa", csqa)):
        (workspace / f"{name}.json").write_text(json.dumps(table))
    assert main(["mmac", "--fraction", "1", "--out", workspace / "mmac.jsonl", "--data-files",
                 f"mmlu={workspace / 'mmlu.parquet'}", *(f"{n}={workspace / n}.json" for n in ("medqa", "arc_c", "csqa"))]) == 0
    assert len(read_jsonl(workspace / "mmac.jsonl")) == 20 + 4 + 4 + 4


# ---------------------------------------------------------------------------------- errors

def _bad_inputs(workspace, tmp_path):
    """(arguments, what the one error line must say); each fails before the model loads."""
    split, model = _split(workspace), _model(workspace)
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"label": "A", "question": "Q?"}\n{"label": "A", "question": "caf\xe9"}\n')
    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text('{"label": "A", "question": "Q?"}\n{"label": "Z", "question": "Q?"}\n')
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "old.txt").write_text("x")
    out = ["--out", tmp_path / "out"]
    return [
        (["demo", "--model", "does/not/exist", *out], "--model does/not/exist: no such folder or file"),
        (["demo", "--model", "no-such-org/no-such-model", *out], "not in the local hub cache, and HF_HUB_OFFLINE"),
        (["demo", *model, "--device", "cuda:7", *out], "--device cuda:7"),
        (["demo", *model, "--out", a_file], f"--out {a_file} is a file; give a folder"),
        (["demo", *model, "--trainable", "last:abc", *out], "trainable must be 'all' or 'last:N'"),
        (["infer-and-split", "--data", latin1, *model, *out], f"{latin1}:2: not UTF-8 text"),
        (["infer-and-split", "--data", bad_label, *model, *out], ("label 'Z' is not one of A, B, C, D", f"{bad_label}:2")),
        (["infer-and-split", "--data", tmp_path / "missing.jsonl", *model, *out], "missing.jsonl: no such file"),
        (["inject", *split, *model, "--optimizers", "adamw", "--lr", "sgd=0.1", *out],
         "--lr sgd=0.1: sgd is not among --optimizers (adamw)"),
        (["inject", *split, *model, "--lr", "adamm=1e-4", *out], "no optimizer 'adamm'"),
        (["inject", *split, *model, "--out", full], f"--out {full} is not empty; pass --overwrite"),
        (["inject", *split, *model, "--resume", "--out", full], "holds a finished run, with nothing to resume"),
        (["inject", *split, *model, "--no-checkpoints", "--resume", *out], "need checkpoints: drop --no-checkpoints"),
        (["demo", *model, "--resume", *out], "need checkpoints: add --checkpoints"),
        (["table2", *split, *model, "--epochs", "3", *out], "table2 does not take --epochs 3"),
        (["table1", *split, *model, "--reference-dtype", "sign2", *out], "table1 does not take --reference-dtype"),
    ]


def test_bad_input_is_one_error_line_before_the_model_loads(workspace, tmp_path, capsys, monkeypatch):
    import cnl_ext.experiments.model as model_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(model_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    for args, expected in _bad_inputs(workspace, tmp_path):
        try:
            status = main(list(map(str, args)))
        except SystemExit as exit_:  # argparse's own errors
            status = exit_.code
        err = capsys.readouterr().err
        assert status == 2, args
        expected = (expected,) if isinstance(expected, str) else expected
        assert err.startswith("error: ") and err.count("\n") == 1 and all(e in err for e in expected), (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "nothing is left behind"


def test_error_exit_status_and_debug_traceback(workspace, tmp_path):
    args = ["demo", "--model", tmp_path / "nothing-here", "--out", tmp_path / "out"]
    plain = cli(*args)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and plain.stderr.startswith("error: --model ")
    mmlu = tmp_path / "mmlu.json"
    mmlu.write_text(json.dumps([{"question": "Q?", "choices": list("abcd"), "answer": -1}]))
    debug = cli("prepare-data", "--dataset", "mmlu", "--data-files", mmlu, "--out", tmp_path / "q.jsonl", "--debug")
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert "answer -1 is not an option index 0-3" in debug.stderr, "a negative answer must not become D"


# ---------------------------------------------------------------------------------- outputs, checkpoints, resume

def test_interrupted_run_resumes_to_the_same_numbers(workspace, tmp_path, capsys):
    args = ["inject", *_split(workspace), *_model(workspace), "--optimizers", "adamw", "--methods", "ft", "cnl",
            "--epochs", "3", "--lr", "1e-3", "--reference-every", "5", *TRAIN]
    assert main([*map(str, args), "--out", str(tmp_path / "whole")]) == 0

    out = tmp_path / "resumed"
    stopped = cli(*args, "--out", out, env={"CNL_EXT_INTERRUPT_AFTER_EPOCH": "1"})
    assert stopped.returncode == 130 and not out.exists()
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        f"interrupted: saved adamw FT after epoch 1 of 3 in {tmp_path / '.resumed.partial'}; continue with: "
        "python -m cnl_ext inject ")
    assert stopped.stderr.rstrip().endswith(f"--out {out} --resume")
    saved = {p.name for p in (tmp_path / ".resumed.partial" / "checkpoints").iterdir()}
    assert saved == {"start.pt", "run-adamw-ft.pt"}
    # In a log (not a terminal): one line per epoch, no progress-bar escape codes.
    assert re.search(r"^adamw FT epoch 1/3: learned \d+/\d+ \(\d+%\), forgot \d+/\d+ \(\d+%\), loss [\d.]+, \d+ s$",
                     stopped.stdout, re.M)
    assert "\r" not in stopped.stdout + stopped.stderr and "\x1b" not in stopped.stdout + stopped.stderr

    assert main([*map(str, args), "--out", str(out), "--resume", "--epochs", "4"]) == 2
    assert "--epochs 3 then, 4 now" in capsys.readouterr().err
    resumed = cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "adamw FT: resuming after epoch 1 of 3" in resumed.stdout
    assert re.search(r"^adamw CNL epoch 3/3: .*collaborative \d+\.\d%", resumed.stdout, re.M)
    assert _rows(out / "summary.csv") == _rows(tmp_path / "whole" / "summary.csv")
    assert {p.name for p in out.iterdir()} == {"summary.csv", "results.json", "tables.md", "curves.png"}
    assert not (tmp_path / ".resumed.partial").exists(), "finished: checkpoints deleted, staging moved into place"


def test_demo_default_folder_is_replaced_only_when_it_holds_a_demo(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = ["demo", *map(str, _model(workspace)), *DEMO, "--checkpoints", "--keep-checkpoints"]
    assert main(demo) == 0
    first = (tmp_path / "runs" / "demo" / "results.json").read_text()
    assert {p.name for p in (tmp_path / "runs" / "demo").iterdir()} >= {
        "summary.csv", "results.json", "tables.md", "curves.png", "mastered.jsonl", "injection.jsonl", "teach.json",
        "checkpoints"}
    assert re.search(rf"\| adamw \| CNL \| {CELL} \| {CELL} \|", capsys.readouterr().out)
    assert main(demo) == 0, "the README's first command works when run twice"
    assert (tmp_path / "runs" / "demo" / "results.json").read_text() != first  # replaced (a new finish time)
    (tmp_path / "runs" / "demo" / "notes.txt").write_text("mine")
    assert main(demo) == 2 and "runs/demo is not empty" in capsys.readouterr().err
    assert (tmp_path / "runs" / "demo" / "notes.txt").exists()


@pytest.fixture(scope="module")
def demo_one_thread(workspace):
    out = workspace / "demo_threads1"
    assert main(["demo", *map(str, _model(workspace)), *DEMO, "--threads", "1", "--out", str(out)]) == 0
    return out


def test_demo_writes_no_checkpoints_unless_asked(demo_one_thread):
    """A 3-minute run: the 2.5 GB of checkpoints cost more than a rerun, so the demo saves them only with
    --checkpoints; what it writes by default is small."""
    written = [p for p in demo_one_thread.rglob("*") if p.is_file()]
    assert "checkpoints" not in {p.name for p in demo_one_thread.iterdir()}
    assert 0 < sum(p.stat().st_size for p in written) < 5 * 2**20, [(p.name, p.stat().st_size) for p in written]


def test_demo_is_the_same_with_one_or_two_threads(workspace, tmp_path):
    """A short demo (two threads on a busy 2-core machine are slow): the same summary.csv with 1 and 2 threads."""
    import torch

    short = ["--questions", "8", "--teach-lr", "3e-3", "--teach-epochs", "6", "--epochs", "1", "--lr", "3e-3", *TRAIN]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            assert main(["demo", *map(str, _model(workspace)), *short, "--threads", str(n),
                         "--out", str(tmp_path / f"threads{n}")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert _rows(tmp_path / "threads1" / "summary.csv") == _rows(tmp_path / "threads2" / "summary.csv")


def test_interrupted_demo_resumes_without_teaching_again(workspace, demo_one_thread, tmp_path, monkeypatch, capsys):
    demo = ["demo", *map(str, _model(workspace)), *DEMO, "--threads", "1", "--checkpoints",
            "--out", str(tmp_path / "demo")]
    monkeypatch.setenv("CNL_EXT_INTERRUPT_AFTER_EPOCH", "1")
    assert main(demo) == 130
    assert "interrupted: saved adamw FT after epoch 1 of 2" in capsys.readouterr().err
    monkeypatch.delenv("CNL_EXT_INTERRUPT_AFTER_EPOCH")
    assert main([*demo, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "teaching: done before the interruption" in printed and "teach epoch" not in printed
    assert _rows(tmp_path / "demo" / "summary.csv") == _rows(demo_one_thread / "summary.csv")
    resumed = json.loads((tmp_path / "demo" / "results.json").read_text())
    whole = json.loads((demo_one_thread / "results.json").read_text())
    assert resumed["teach_log"] == whole["teach_log"] and resumed["n_excluded"] == whole["n_excluded"]


# ---------------------------------------------------------------------------------- what a person reads

def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices


def test_help_every_option_explained_with_its_default():
    parser, commands = _subparsers()
    top = parser.format_help()
    assert "``" not in top and ":mod:" not in top
    for name, command in commands.items():
        text = command.format_help()
        assert "``" not in text and ":func:" not in text, name
        assert re.search(r"^example:\n  python -m cnl_ext " + re.escape(name), text, re.M), name
        assert re.search(rf"^    {re.escape(name)}\s+\S", top, re.M) or f"    {name}\n" in top, name
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, True, ()) and not action.required:
                shown = " ".join(map(str, action.default)) if isinstance(action.default, tuple) else str(action.default)
                assert f"(default: {shown})" in action.help or (
                    name == "continual" and "(default" in action.help), f"{name} {action.option_strings[0]}"
    inject = commands["inject"]
    reference_dtype = next(a for a in inject._actions if "--reference-dtype" in a.option_strings)
    assert set(reference_dtype.choices) == {"float32", "bfloat16", "int8", "sign2"}
    from cnl_ext import functional

    backend = next(a for a in inject._actions if "--backend" in a.option_strings)
    assert set(functional.BACKENDS) <= set(backend.choices)


def test_the_adaptive_reference_is_the_default_and_off_turns_an_option_off(capsys):
    """``off`` gives None to an optional option whose default is a value; anything else is its type's."""
    from cnl_ext.experiments.continual_setup import ContinualConfig
    from cnl_ext.experiments.options import build
    from cnl_ext.experiments.protocol import InjectConfig
    from cnl_ext.experiments.reference_schedule import DEFAULT_TOLERANCE

    parser, commands = _subparsers()
    split = ["inject", "--mastered", "m.jsonl", "--injection", "i.jsonl", "--out", "o"]

    def inject_config(*extra):
        return build(InjectConfig, parser.parse_args([*split, *extra]), commands["inject"])

    assert InjectConfig().adaptive_reference == DEFAULT_TOLERANCE == ContinualConfig(tasks=["a=x"]).adaptive_reference
    assert inject_config().adaptive_reference == DEFAULT_TOLERANCE
    assert inject_config("--adaptive-reference", "0.5").adaptive_reference == 0.5
    off = inject_config("--adaptive-reference", "off", "--reference-tokens", "off")
    assert off.adaptive_reference is None and off.reference_tokens is None
    continual = parser.parse_args(["continual", "--task", "a=x", "--adaptive-reference", "off", "--out", "o"])
    assert build(ContinualConfig, continual, commands["continual"]).adaptive_reference is None
    with pytest.raises(SystemExit):
        parser.parse_args([*split, "--adaptive-reference", "none"])
    assert "invalid float value: 'none'" in capsys.readouterr().err
    assert "--adaptive-reference TOL|off" in commands["inject"].format_help()


def test_each_option_is_declared_once():
    """Subcommands take only what they use; a field shared by two settings is one option."""
    _, commands = _subparsers()
    for name, command in commands.items():
        flags = [f for a in command._actions for f in a.option_strings]
        assert len(flags) == len(set(flags)), name
    table2 = {f for a in commands["table2"]._actions for f in a.option_strings}
    assert not table2 & {"--epochs", "--optimizers", "--lr", "--methods", "--resume"}


def test_info_says_what_runs_here():
    result = cli("info")
    assert result.returncode == 0, result.stderr
    import torch

    text = result.stdout
    assert f"torch {torch.__version__}" in text and "transformers " in text and "CUDA " in text
    assert re.search(r"^compiled extension: (built|not available) \(", text, re.M)
    # cnl_ext._C's CUDA release and architectures, or why it is not loaded (a CPU-only torch: not built)
    assert re.search(r"^CUDA kernels \(cnl_ext\._C\): (built for CUDA \d+\.\d+, architectures \S+; |not loaded \()",
                     text, re.M)
    assert re.search(r"^  torch\s+usable on cpu", text, re.M)
    assert re.search(r"^  auto\s+cpu tensors -> \w+", text, re.M)
    from cnl_ext import functional

    for name in functional.BACKENDS:
        if name != "auto":
            assert re.search(rf"^  {name}\s+(usable|not usable|an alias)", text, re.M), name


def test_curves_have_whole_epochs_and_one_percent_scale():
    from cnl_ext.experiments.protocol import EpochRecord, RunResult
    from cnl_ext.experiments.report import curves_figure

    epochs = [EpochRecord(e, None, e, 3 - e, None, [], [], 0.0) for e in range(4)]
    figure = curves_figure([RunResult("cnl", "adamw", 1e-4, 7, 5, epochs)], "t")
    learned, forgot = figure.axes
    assert learned.get_ylim() == forgot.get_ylim() and learned.get_ylim()[0] <= 0 and learned.get_ylim()[1] >= 100
    ticks = [t for t in learned.get_xticks() if 0 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_markdown_tables_come_from_one_helper():
    from cnl_ext.experiments.report import markdown_table

    assert markdown_table(["a", "b"], [[1, "x|y"]], align="lr") == "| a | b |\n|---|--:|\n| 1 | x\\|y |\n"
    with pytest.raises(ValueError, match="2 cells"):
        markdown_table(["a", "b"], [[1]])


# ---------------------------------------------------------------------------------- the README's claims

def test_readme_use_snippet_prints_statistics(capsys):
    import torch

    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", readme, re.S).group(1)
    model = torch.nn.Linear(4, 2)
    batches = [torch.randn(3, 4) for _ in range(2)]
    namespace = dict(model=model, mastered_batches=batches, injection_batches=batches,
                     loss_fn=lambda m, x: m(x).square().mean())
    exec(compile(snippet, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "None" not in printed and "collaborative" in printed.lower()


def test_quickstart_prints_what_the_readme_says():
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py"), "--device", "cpu"],
                            capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    adamw = re.search(r"AdamW: M 0\.0000 -> ([\d.]+), I ([\d.]+) -> ([\d.]+)", result.stdout)
    cnl = re.search(r"FusedCNLAdamW: M 0\.0000 -> ([\d.]+), I ([\d.]+) -> ([\d.]+)", result.stdout)
    m_adamw, m_cnl = float(adamw.group(1)), float(cnl.group(1))
    assert m_cnl < m_adamw / 10, "CNL raises the mastered loss far less than AdamW"
    assert float(cnl.group(3)) < float(cnl.group(2)), "and still lowers the injected loss"
    readme = (REPO / "README.md").read_text()
    assert f"AdamW raises the loss on M to {m_adamw:.3f}, CNL to {m_cnl:.4f}" in " ".join(readme.split())


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    from cnl_ext.experiments.outputs import atomic_write, write_text

    path = tmp_path / "results.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as out:
            out.write("half of the new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_continual_refuses_a_non_empty_out_dir_before_loading_the_model(workspace, capsys):
    out = workspace / "continual-busy"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier run's file")
    task = f"a={workspace / 'questions.jsonl'}"
    assert main(["continual", "--task", task, "--model", workspace / "no-such-model", "--out", out]) == 2
    assert "is not empty; pass --resume to continue its runs" in capsys.readouterr().err
    assert (out / "earlier.txt").exists()
    assert main(["continual", "--task", task, "--out", out, "--resume", "--overwrite"]) == 2
    assert "give one of the two" in capsys.readouterr().err


# the settings a continual run was saved with before its model and output options joined the CLI's
CONTINUAL_RUN_SETTINGS = {
    "backend", "batch_size", "betas", "dtype", "epochs", "eps", "gguf_file", "heldout_fraction", "importance_betas",
    "kif_beta", "kif_gamma", "kif_quantile", "kif_tau", "kif_unit", "lora_alpha", "lora_lr", "lora_r", "lr",
    "max_grad_norm", "memory_per_task", "model", "orth_weight", "questions_per_task", "reference_batch_size",
    "rkif_inner_steps", "rkif_outer_steps", "rkif_quantile", "rkif_rule", "tasks", "trainable", "use_chat_template",
    "weight_decay"}


def test_continual_overwrites_resumes_a_finished_folder_and_takes_the_old_spellings(workspace, capsys):
    out = workspace / "continual"
    out.mkdir()
    (out / "stale.png").write_bytes(b"an earlier run's chart")
    task = f"a={workspace / 'questions.jsonl'}"
    settings = ["--task", task, *_model(workspace), "--questions-per-task", "8", "--epochs", "1", *TRAIN]
    assert main(["continual", *settings, "--methods", "ft", "--out", out, "--overwrite"]) == 0
    assert not (out / "stale.png").exists() and list((out / "runs").iterdir())  # emptied first
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("python -m cnl_ext continual --task ") and results["weights_sha256"]
    assert results["config"]["model"] == str(workspace / "model") and results["config"]["use_chat_template"]
    saved = (out / "runs" / "seed0_order0_ft.json").read_text()
    # the keys of the run folders made before, which still resume, and the adaptive period, their default
    # since (they resume with --adaptive-reference off: test_continual)
    assert set(json.loads(saved)["settings"]) == CONTINUAL_RUN_SETTINGS | {"adaptive_reference"}
    capsys.readouterr()
    # --resume adds a method to a finished folder and reads the finished run back; the old spellings still work
    assert main(["continual", *settings, "--methods", "ft", "replay", "--out-dir", out, "--no-use-chat-template",
                 "--resume"]) == 2
    captured = capsys.readouterr()
    assert "warning: --out-dir is deprecated; use --out" in captured.err
    assert "warning: --no-use-chat-template is deprecated; use --no-chat-template" in captured.err
    assert "other settings (use_chat_template)" in captured.err  # the saved run used the chat template
    assert main(["continual", *settings, "--methods", "ft", "replay", "--out-dir", out, "--resume"]) == 0
    assert (out / "runs" / "seed0_order0_ft.json").read_text() == saved
    summary = _rows(out / "summary.csv")
    assert [row["method"] for row in summary] == ["ft", "replay"]
    assert not list(workspace.glob(".continual*.partial")), "the staging folder was moved into place"


def test_resume_accepts_an_option_added_since_at_its_default(tmp_path):
    """A run interrupted before an option existed resumes when that option holds its default (what the run
    did), and is refused when it does not."""
    from cnl_ext.experiments.outputs import OutputFolder, UsageError

    then = {"--epochs": 3}
    first = OutputFolder(tmp_path / "out")
    first.check(then)
    first.open(then)  # interrupted: the staging folder stays, recording the options of then
    now, defaults = {"--epochs": 3, "--reference-tokens": 4096}, {"--epochs": 25, "--reference-tokens": 4096}
    resumed = OutputFolder(tmp_path / "out", resume=True)
    resumed.check(now, defaults=defaults)
    assert resumed.resuming
    with pytest.raises(UsageError, match="--reference-tokens None then, 512 now"):
        OutputFolder(tmp_path / "out", resume=True).check(dict(now, **{"--reference-tokens": 512}), defaults=defaults)
    with pytest.raises(UsageError, match="--reference-tokens None then, 4096 now"):
        OutputFolder(tmp_path / "out", resume=True).check(now)  # no defaults known: any new option differs
