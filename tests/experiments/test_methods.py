"""The methods beside FT / CNL / replay / LoRA: KORE's and CorDA's adapters (outputs unchanged at init, only
the intended parameters train), CKL's update task and FUAR, and every new method end to end through the
``inject``, ``continual`` and ``ckl`` commands on a tiny model."""
from __future__ import annotations

import csv
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from cnl_ext.cli import main  # noqa: E402
from cnl_ext.experiments import MCQEncoder, make_demo_questions, write_jsonl  # noqa: E402
from cnl_ext.experiments.adapters import knowledge_adapters  # noqa: E402
from cnl_ext.experiments.ckl import ckl_rows, ckl_table, fuar, make_update_task  # noqa: E402
from cnl_ext.experiments.protocol import EpochRecord, RunResult  # noqa: E402

from .test_experiments import tiny_model, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("native_built")
TRAIN = ["--eval-batch-size", "8", "--threads", "1", "--backend", "torch"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


# tiny Llama: hidden 64, 4 heads of 16, 2 key/value heads; q_proj, o_proj 64x64, k_proj, v_proj 32x64; 2 layers
OUT_DIMS = (64, 32, 32, 64)
IN_DIM, LAYERS, RANK = 64, 2, 4


@pytest.mark.parametrize("method, trained", [
    ("kore", LAYERS * RANK * sum(OUT_DIMS)),  # lora_B (m x r) only
    ("corda", LAYERS * RANK * (sum(OUT_DIMS) + 4 * IN_DIM)),  # lora_B and lora_A (r x n)
])
def test_adapters_leave_outputs_unchanged_at_init_and_train_the_intended_params(tokenizer, method, trained):
    encoder = MCQEncoder(tokenizer)
    model = tiny_model(len(tokenizer))
    memory, others = make_demo_questions(16, seed=2)[:12], make_demo_questions(8, seed=9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    device = next(model.parameters()).device
    logits = encoder.next_token_logits(model, encoder.encode(others, device)).detach()
    with knowledge_adapters(method, model, encoder, memory, r=RANK, alpha=8) as (wrapped, info):
        assert info["init_max_abs_dlogits"] < 1e-5
        with torch.no_grad():  # questions outside the memory too: the decomposition is exact
            assert torch.allclose(encoder.next_token_logits(wrapped, encoder.encode(others, device)), logits,
                                  atol=1e-5, rtol=0)
        names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        assert info["trainable_params"] == trained == sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert info["lora_params"] == LAYERS * RANK * (sum(OUT_DIMS) + 4 * IN_DIM)
        assert all(".lora_" in n for n in names) and all(".lora_B." in n for n in names) == (method == "kore")
        if method == "kore":  # lora_A's rows lie in the directions the memory's inputs use least
            layer = wrapped.base_model.model.model.layers[0].self_attn.q_proj
            a = layer.lora_A["default"].weight
            inputs = []
            handle = layer.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().reshape(-1, IN_DIM)))
            with torch.no_grad():
                encoder.next_token_logits(wrapped, encoder.encode(memory[:4], device))
            handle.remove()
            x = torch.cat(inputs)
            used = torch.linalg.matrix_norm(x @ a.T) / (torch.linalg.matrix_norm(x) * torch.linalg.matrix_norm(a))
            assert used < 0.2
    # merged back on exit: the weights are the starting ones (up to rounding), nothing trained
    after = model.state_dict()
    assert set(after) == set(start) and all(torch.allclose(after[k], start[k], atol=1e-6) for k in start)


def test_fuar_from_a_hand_made_table():
    assert fuar(3, 4, 2) == 0.5 and fuar(0, 1, 0) == 0.0 and fuar(2, 0, 0) is None and fuar(0, 0, 0) is None
    # two updated questions (indices 0, 1), three new ones; five invariant
    run = RunResult("ft", "adamw", 1e-3, 5, 5, [
        EpochRecord(0, None, 0, 0, None, [], [], 0.0),
        EpochRecord(1, 0.5, 2, 1, None, [1, 3], [4], 1.0),
        EpochRecord(2, 0.4, 5, 3, None, [0, 1, 2, 3, 4], [0, 2, 4], 2.0)])
    rows = ckl_rows([run], n_updated=2)
    assert [(r["forgotten"], r["updated"], r["acquired"], r["fuar"]) for r in rows] == [
        (0, 0, 0, None), (1, 1, 1, 0.5), (3, 2, 3, 0.6)]
    assert rows[0]["n_new"] == 3 and rows[0]["n_invariant"] == 5
    assert "| adamw | FT | 3/5 | 2/2 | 3/3 | 0.600 |" in ckl_table(rows)
    assert "| n/a |" in ckl_table(rows[:1])


def test_update_task_changes_a_seeded_share_of_the_answers():
    mastered, injection = make_demo_questions(12, seed=1), make_demo_questions(5, seed=2)
    task = make_update_task(mastered, injection, fraction=0.25, seed=3)
    assert len(task.updated) == 3 and len(task.invariant) == 9 and task.new == injection
    assert [q.prompt for q in task.updated] == [q.prompt for q in task.outdated]
    assert all(new.label != old.label for new, old in zip(task.updated, task.outdated))
    assert {q.prompt for q in task.outdated} | {q.prompt for q in task.invariant} == {q.prompt for q in mastered}
    again = make_update_task(mastered, injection, fraction=0.25, seed=3)
    assert [(q.prompt, q.label) for q in again.updated] == [(q.prompt, q.label) for q in task.updated]
    other = make_update_task(mastered, injection, fraction=0.25, seed=4)
    assert [(q.prompt, q.label) for q in other.updated] != [(q.prompt, q.label) for q in task.updated]


# ---------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A tiny model taught half of 24 questions (the taught-first split ``inject`` and ``ckl`` start from)."""
    root = tmp_path_factory.mktemp("methods")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    write_jsonl(root / "questions.jsonl", make_demo_questions(24, seed=5))
    assert main(["teach", "--data", root / "questions.jsonl", "--model", root / "base", "--teach-lr", "3e-3",
                 "--teach-epochs", "30", "--out", root / "taught", *TRAIN]) == 0
    return root


def _split(root):
    folder = root / "taught"
    return ["--model", folder / "model", "--mastered", folder / "mastered.jsonl", "--injection",
            folder / "injection.jsonl"]


NEW_METHODS = ["kore", "corda"]


def test_inject_and_out_of_set_with_the_new_methods(taught):
    out = taught / "inject"
    assert main(["inject", *_split(taught), "--methods", "ft", *NEW_METHODS, "--epochs", "2", "--lr", "3e-3",
                 "--lora-r", "4", "--lora-alpha", "8", "--out", out, *TRAIN]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["ft", *NEW_METHODS]
    assert runs[0]["adapter"] is None
    for run in runs[1:]:
        assert run["adapter"]["init_max_abs_dlogits"] < 1e-5 and run["adapter"]["trainable_params"] > 0
        assert run["epochs"][0]["forgot"] == 0  # outputs unchanged at init: nothing mastered is lost yet
    assert runs[1]["adapter"]["trainable_params"] < runs[2]["adapter"]["trainable_params"]  # kore: lora_B only
    assert "| adamw | KORE |" in (out / "tables.md").read_text()
    oos = taught / "oos"
    assert main(["out-of-set", *_split(taught), "--methods", "kore", "--epochs", "1", "--lr", "3e-3", "--lora-r", "4",
                 "--lora-alpha", "8", "--out", oos, *TRAIN]) == 0
    results = json.loads((oos / "results.json").read_text())
    assert results["runs"][0]["adapter"]["memory"] == results["seen_half"]  # the reference half is the memory


def test_ckl_command_every_method(taught, capsys):
    out = taught / "ckl"
    methods = ["ft", "cnl", "replay", "lora", *NEW_METHODS]
    assert main(["ckl", *_split(taught), "--methods", *methods, "--epochs", "2", "--lr", "3e-3", "--lora-r", "4",
                 "--lora-alpha", "8", "--update-fraction", "0.25", "--out", out, *TRAIN]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    mastered = len(open(taught / "taught" / "mastered.jsonl").readlines())
    assert results["n_updated"] == round(mastered * 0.25) and results["n_updated"] + results["n_invariant"] == mastered
    assert [r["method"] for r in results["runs"]] == methods
    rows = list(csv.DictReader(open(out / "ckl.csv")))
    assert len(rows) == len(methods) * 3 and {r["method"] for r in rows} == set(methods)
    assert all(r["fuar"] == "" for r in rows if r["epoch"] == "0")  # nothing updated or acquired yet: undefined
    for r in rows:
        gained = int(r["updated"]) + int(r["acquired"])
        assert (r["fuar"] == "") == (gained == 0)
        assert not gained or float(r["fuar"]) == pytest.approx(int(r["forgotten"]) / gained)
    assert sum(int(r["updated"]) + int(r["acquired"]) for r in rows) > 0  # lr 3e-3 moves answers
    table = (out / "tables.md").read_text()
    assert "FUAR" in table and "| adamw | CORDA |" in table and table.count("| adamw |") == 2 * len(methods)
    assert "FUAR" in printed
    assert {p.name for p in out.iterdir()} == {"summary.csv", "results.json", "tables.md", "curves.png", "ckl.csv",
                                               "updated.jsonl"}


def test_continual_command_with_the_new_methods(taught):
    questions = make_demo_questions(24, seed=8)
    write_jsonl(taught / "task_a.jsonl", questions[:12])
    write_jsonl(taught / "task_b.jsonl", questions[12:])
    out = taught / "continual"
    assert main(["continual", "--task", f"a={taught / 'task_a.jsonl'}", "--task", f"b={taught / 'task_b.jsonl'}",
                 "--model", taught / "base", "--methods", *NEW_METHODS, "--questions-per-task", "10",
                 "--memory-per-task", "8", "--epochs", "1", "--lora-r", "4", "--lora-alpha", "8", "--lora-lr", "3e-3",
                 "--out", out, *TRAIN]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == NEW_METHODS
    for run in runs:  # task 1: plain LoRA (no memory yet); task 2: built from task 1's 8 memory questions
        assert [i["memory"] for i in run["adapters"]] == [0, 8] and run["adapters"][1]["method"] == run["method"]
        assert run["adapters"][1]["init_max_abs_dlogits"] < 1e-5
    assert {row["method"] for row in csv.DictReader(open(out / "summary.csv"))} == set(NEW_METHODS)
