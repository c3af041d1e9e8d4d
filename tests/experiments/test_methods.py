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


NEW_METHODS = ["kore", "corda", "ewc", "agem"]


def test_inject_and_out_of_set_with_the_new_methods(taught):
    out = taught / "inject"
    assert main(["inject", *_split(taught), "--methods", "ft", *NEW_METHODS, "--epochs", "2", "--lr", "3e-3",
                 "--lora-r", "4", "--lora-alpha", "8", "--out", out, *TRAIN]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["ft", *NEW_METHODS]
    assert [r["adapter"] is None for r in runs] == [True, False, False, True, True]
    for run in runs[1:3]:
        assert run["adapter"]["init_max_abs_dlogits"] < 1e-5 and run["adapter"]["trainable_params"] > 0
    assert all(run["epochs"][0]["forgot"] == 0 for run in runs)  # unchanged at the start: nothing mastered is lost
    assert runs[1]["adapter"]["trainable_params"] < runs[2]["adapter"]["trainable_params"]  # kore: lora_B only
    # lr 3e-3 moves answers; not necessarily KORE's in 2 epochs: its frozen lora_A lies where the mastered questions'
    # inputs are small, and the injection questions (the same templates) have small inputs there too
    assert all(run["epochs"][-1]["learned"] > 0 for run in runs if run["method"] != "kore")
    table = (out / "tables.md").read_text()
    assert all(f"| adamw | {m.upper()} |" in table for m in NEW_METHODS)
    assert main(["inject", *_split(taught), "--methods", "agem", "--reference-dtype", "int8", "--out",
                 taught / "agem-int8", *TRAIN]) == 2  # refused before the model loads: A-GEM needs magnitudes
    assert not (taught / "agem-int8").exists()
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
    for run in runs[:2]:  # task 1: plain LoRA (no memory yet); task 2: built from task 1's 8 memory questions
        assert [i["memory"] for i in run["adapters"]] == [0, 8] and run["adapters"][1]["method"] == run["method"]
        assert run["adapters"][1]["init_max_abs_dlogits"] < 1e-5
    assert {row["method"] for row in csv.DictReader(open(out / "summary.csv"))} == set(NEW_METHODS)
    assert [r["notes"][0] for r in runs if r["method"] == "ewc"] == ["ewc: Fisher over 8 memory questions"]


def test_ewc_fisher_once_before_training_and_agem_reference_every_epoch(tokenizer, monkeypatch):
    """EWC: F over the mastered set, captured once before training; A-GEM: an optimizer with rule="agem",
    its reference over the mastered set recomputed at every epoch as CNL's (with the adaptive period off)."""
    from cnl_ext.experiments import protocol

    encoder = MCQEncoder(tokenizer)
    questions = make_demo_questions(10, seed=4)
    mastered, injection = questions[:6], questions[6:]
    fisher, references, rules = [], [], []
    real_fisher, real_reference, real_make = protocol.capture_fisher, protocol.compute_reference, protocol.make_optimizer

    def make_optimizer(config, params, **kwargs):
        optimizer = real_make(config, params, **kwargs)
        rules.append((optimizer.rule, optimizer.ewc_lambda))
        return optimizer

    def capture(optimizer, model, encoder, questions, **kwargs):
        fisher.append([q.prompt for q in questions])
        real_fisher(optimizer, model, encoder, questions, **kwargs)
        states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
        assert all("ewc_fisher" in s and "ewc_anchor" in s for s in states)

    def reference(optimizer, model, encoder, questions, *, batch_size, **memory_bounds):
        references.append([q.prompt for q in questions])
        return real_reference(optimizer, model, encoder, questions, batch_size=batch_size, **memory_bounds)

    monkeypatch.setattr(protocol, "capture_fisher", capture)
    monkeypatch.setattr(protocol, "compute_reference", reference)
    monkeypatch.setattr(protocol, "make_optimizer", make_optimizer)
    config = protocol.InjectConfig(optimizer="adamw", lr=3e-3, epochs=2, weight_decay=0.0, eval_batch_size=8,
                                   backend="torch", ewc_lambda=50.0, adaptive_reference=None)
    runs = protocol.compare(tiny_model(len(tokenizer)), encoder, methods=["ewc", "agem"], optimizers=["adamw"],
                            config=config, train=injection, reference=mastered)
    assert [r.method for r in runs] == ["ewc", "agem"] and all(len(r.epochs) == 3 for r in runs)
    assert rules == [("cnl", 50.0), ("agem", 0.0)]
    assert fisher == [[q.prompt for q in mastered]]
    assert references == [[q.prompt for q in mastered]] * 2


def test_carry_ewc_moves_only_the_fisher_and_anchor():
    from cnl_ext import FusedCNLAdamW
    from cnl_ext.experiments.methods import carry_ewc

    weights = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    first = FusedCNLAdamW(weights, lr=1e-2, ewc_lambda=1.0, ewc_decay=0.5, backend="torch")
    sum(w.square().sum() for w in weights).backward()
    first.step()
    with first.capture_fisher() as fisher:
        fisher.backward(sum(w.sum() for w in weights))
    second = FusedCNLAdamW(weights, lr=1e-2, ewc_lambda=1.0, ewc_decay=0.5, backend="torch")
    carry_ewc(first, second)
    for w in weights:
        assert set(second.state[w]) == {"ewc_fisher", "ewc_anchor"}  # no moments, no step count: a fresh optimizer
        assert torch.equal(second.state[w]["ewc_fisher"], torch.ones_like(w))  # the squared gradient of sum(w)
        assert torch.equal(second.state[w]["ewc_anchor"], w.detach())
    with second.capture_fisher() as fisher:  # online: F ← γ·F + F_new
        fisher.backward(sum(2 * w.sum() for w in weights))
    assert all(torch.equal(second.state[w]["ewc_fisher"], torch.full_like(w, 0.5 + 4.0)) for w in weights)
    second.zero_grad()
    sum(w.sum() for w in weights).backward()
    second.step()
    assert all(int(second.state[w]["step"]) == 1 for w in weights)


def test_ckl_interrupted_twice_resumes_to_the_same_numbers(taught, monkeypatch, capsys):
    """KORE's adapter is rebuilt from the starting weights and its trained factor loaded; EWC's F and θ* come
    back with the optimizer's state."""
    args = ["ckl", *_split(taught), "--methods", "kore", "ewc", "--epochs", "2", "--lr", "3e-3", "--lora-r", "4",
            "--lora-alpha", "8", *TRAIN]
    assert main([*args, "--out", taught / "ckl-whole"]) == 0
    out = taught / "ckl-resumed"
    monkeypatch.setenv("CNL_EXT_INTERRUPT_AFTER_EPOCH", "1")
    assert main([*args, "--out", out]) == 130  # kore after epoch 1
    assert main([*args, "--out", out, "--resume"]) == 130  # kore finished, ewc after epoch 1
    assert "interrupted: saved adamw EWC after epoch 1 of 2" in capsys.readouterr().err
    monkeypatch.delenv("CNL_EXT_INTERRUPT_AFTER_EPOCH")
    assert main([*args, "--out", out, "--resume"]) == 0
    assert (out / "ckl.csv").read_text() == (taught / "ckl-whole" / "ckl.csv").read_text()
    drop = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert drop(csv.DictReader(open(out / "summary.csv"))) == drop(csv.DictReader(open(taught / "ckl-whole" /
                                                                                        "summary.csv")))
