"""``python -m cnl_ext`` subcommands end to end on a tiny local model (saved to a temporary folder)."""
from __future__ import annotations

import csv
import json
import re

import pytest

pytest.importorskip("transformers")
from cnl_ext.cli import main  # noqa: E402
from cnl_ext.experiments import make_demo_questions, read_jsonl, write_jsonl  # noqa: E402

from .test_experiments import tiny_model, tiny_tokenizer  # noqa: E402

CELL = r"\d+ \(\d+\.\d%\)"  # the paper's "count (percent)"
FAST = ["--eval-batch-size", "8", "--threads", "1"]  # model options
TRAIN = [*FAST, "--backend", "torch"]  # and the optimizer's


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    write_jsonl(root / "questions.jsonl", make_demo_questions(20, seed=5))
    return root


def _split(workspace):
    out = workspace / "split"
    if not (out / "split.json").exists():
        assert main(["infer-and-split", "--data", str(workspace / "questions.jsonl"),
                     "--model", str(workspace / "model"), "--out", str(out), *FAST]) == 0
    return ["--mastered", str(out / "mastered.jsonl"), "--injection", str(out / "injection.jsonl")]


def test_infer_and_split(workspace):
    _split(workspace)
    summary = json.loads((workspace / "split" / "split.json").read_text())
    mastered = read_jsonl(workspace / "split" / "mastered.jsonl")
    injection = read_jsonl(workspace / "split" / "injection.jsonl")
    assert summary["mastered"] == len(mastered) and summary["injection"] == len(injection)
    assert len(mastered) + len(injection) == summary["questions"] == 20


def test_inject_writes_readable_outputs(workspace, capsys):
    out = workspace / "inject"
    assert main(["inject", *_split(workspace), "--model", str(workspace / "model"), "--optimizers", "adamw", "sgd",
                 "--methods", "ft", "cnl", "--epochs", "2", "--lr", "adamw=1e-3", "sgd=0.05", "--out", str(out),
                 *TRAIN]) == 0
    table = (out / "tables.md").read_text()
    assert len(re.findall(rf"\| (adamw|sgd) \| (FT|CNL) \| {CELL} \| {CELL} \|", table)) == 4
    assert table in capsys.readouterr().out
    with open(out / "summary.csv") as rows:
        summary = list(csv.DictReader(rows))
    assert len(summary) == 4 * 3 and {r["lr"] for r in summary} == {"0.001", "0.05"}
    assert all(r["collaborative_share"] for r in summary if r["method"] == "cnl" and r["epoch"] != "0")
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["adamw FT", "adamw CNL", "sgd FT", "sgd CNL"]
    assert (out / "curves.png").stat().st_size > 1000


def test_out_of_set_table1_table2(workspace):
    split = _split(workspace)
    model = ["--model", str(workspace / "model")]
    out = workspace / "oos"
    assert main(["out-of-set", *split, *model, "--side", "mastered", "--methods", "ft", "replay", "--epochs", "1",
                 "--lr", "1e-3", "--out", str(out), *TRAIN]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["side"] == "mastered" and results["runs"][0]["n_mastered"] == results["unseen_half"]

    assert main(["table1", *split, *model, "--epochs", "1", "--lr", "1e-3", "--out", str(workspace / "t1"), *TRAIN]) == 0
    rows = json.loads((workspace / "t1" / "table1.json").read_text())["rows"]
    assert [r["group"] for r in rows] == ["Sim", "Dissim"] and rows[0]["size"] == rows[1]["size"]

    assert main(["table2", *split, *model, "--out", str(workspace / "t2"), *TRAIN]) == 0
    table2 = json.loads((workspace / "t2" / "results.json").read_text())["table2"]
    assert table2["collaborative"] + table2["conflicting"] == table2["total"] > 0
    assert re.search(r"\| Collaborative \(s ≥ 0\) \| [\d,]+ \| \d+\.\d\d% \|", (workspace / "t2" / "table2.md").read_text())


def test_teach_saves_a_loadable_model(workspace):
    out = workspace / "taught"
    assert main(["teach", "--data", str(workspace / "questions.jsonl"), "--model", str(workspace / "model"),
                 "--teach-lr", "3e-3", "--teach-epochs", "3", "--out", str(out), *TRAIN]) == 0
    assert json.loads((out / "split.json").read_text())["teach_log"][-1]["epoch"] <= 3
    assert main(["infer-and-split", "--data", str(out / "mastered.jsonl"), "--model", str(out / "model"),
                 "--out", str(out / "resplit"), *FAST]) == 0
    # The saved model is the taught one: it still answers its mastered questions.
    assert json.loads((out / "resplit" / "split.json").read_text())["injection"] == 0


def test_demo_on_a_tiny_model(workspace, capsys):
    out = workspace / "demo"
    assert main(["demo", "--model", str(workspace / "model"), "--questions", "16", "--teach-lr", "3e-3",
                 "--teach-epochs", "80", "--epochs", "1", "--lr", "3e-3", "--trainable", "all", "--out", str(out),
                 *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert re.search(rf"\| adamw \| CNL \| {CELL} \| {CELL} \|", printed)
    assert {p.name for p in out.iterdir()} >= {"summary.csv", "results.json", "tables.md", "curves.png",
                                               "mastered.jsonl", "injection.jsonl", "teach_log.json"}


def test_prepare_data_and_mmac_from_local_files(workspace, capsys):
    pytest.importorskip("datasets")
    import pandas as pd

    rows = [{"question": f"Q{i}?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(20)]
    pd.DataFrame(rows).to_parquet(workspace / "mmlu.parquet")
    out = workspace / "mmlu.jsonl"
    assert main(["prepare-data", "--dataset", "mmlu", "--data-files", str(workspace / "mmlu.parquet"),
                 "--out", str(out)]) == 0
    assert len(read_jsonl(out)) == 2  # the paper's 1/10
    medqa = [{"question": "Q?", "answer": "a", "options": dict(A="a", B="b", C="c", D="d"), "answer_idx": "A"}] * 4
    arc = [{"question": "Q?", "choices": {"text": list("pqrs"), "label": list("ABCD")}, "answerKey": "C"}] * 4
    csqa = [{"question": "Q?", "choices": {"text": list("pqrst"), "label": list("ABCDE")}, "answerKey": "A"}] * 4
    for name, table in (("medqa", medqa), ("arc_c", arc), ("csqa", csqa)):
        (workspace / f"{name}.json").write_text(json.dumps(table))
    assert main(["mmac", "--fraction", "1", "--out", str(workspace / "mmac.jsonl"), "--data-files",
                 f"mmlu={workspace / 'mmlu.parquet'}", *(f"{n}={workspace / n}.json" for n in ("medqa", "arc_c", "csqa"))]) == 0
    assert len(read_jsonl(workspace / "mmac.jsonl")) == 20 + 4 + 4 + 4


def test_bad_input_is_a_clear_error(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"label": "A", "question": "Q?"}\n{"label": "Z", "question": "Q?"}\n')
    assert main(["infer-and-split", "--data", str(bad), "--model", str(workspace / "model"), "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "label 'Z' is not one of A, B, C, D" in error and f"{bad}:2" in error
    assert main(["inject", "--mastered", str(tmp_path / "missing.jsonl"), "--injection", str(bad),
                 "--model", str(workspace / "model"), "--out", str(tmp_path)]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
