"""The continual protocol (cnl_ext.experiments.continual) on a tiny random Llama: every method end to end,
metrics (spec §7.13), memory, importance tracking and Recurrent-KIF's schedule (§7.12)."""
from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from cnl_ext.experiments import continual  # noqa: E402
from cnl_ext.experiments.continual import (CONTINUAL_METHODS, ContinualConfig, continual_metrics,  # noqa: E402
                                           load_tasks, select_memory, task_optimizer)
from cnl_ext import CNLOptimizer  # noqa: E402
from cnl_ext.experiments.data import MCQuestion, write_jsonl  # noqa: E402
from cnl_ext.experiments.demo import make_demo_questions  # noqa: E402
from cnl_ext.experiments.model import MCQEncoder, ModelOptions  # noqa: E402
from cnl_ext.experiments.options import build  # noqa: E402
from cnl_ext.experiments.reference_schedule import DEFAULT_TOLERANCE  # noqa: E402

from .test_experiments import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    questions = make_demo_questions(60, seed=5)
    files = {}
    for t, name in enumerate(("alpha", "beta", "gamma")):
        part = questions[t * 20:(t + 1) * 20]
        write_jsonl(folder / f"{name}_1.jsonl", part[:12])
        write_jsonl(folder / f"{name}_2.jsonl", part[12:])
        files[name] = f"{name}={folder / f'{name}_1.jsonl'},{folder / f'{name}_2.jsonl'}"
    return files


def tiny_config(task_files, **overrides):
    settings = dict(tasks=[task_files["alpha"], task_files["beta"], task_files["gamma"]],
                    questions_per_task=16, heldout_fraction=0.25, memory_per_task=8, epochs=1, batch_size=4,
                    lr=3e-3, lora_lr=3e-3, lora_r=4, lora_alpha=8, backend="torch", eval_batch_size=16,
                    rkif_inner_steps=2, rkif_outer_steps=1)
    return ContinualConfig(**{**settings, **overrides})


def run(config, model, tokenizer, out_dir, *, resume=False):
    return continual.run(config, model, MCQEncoder(tokenizer), out_dir, resume=resume)


# ---------------------------------------------------------------------------------- §7.13 metrics

def test_metrics_on_the_specs_matrix():
    a = [[.6, .3, .2], [.5, .7, .25], [.4, .6, .8]]
    m = continual_metrics(a, base=[.1, .2, .05])
    assert m["AP"] == pytest.approx(.6) and m["FWT"] == pytest.approx(.275) and m["BWT"] == pytest.approx(-.15)
    assert m["FWT_gem"] == pytest.approx(((.3 - .2) + (.25 - .05)) / 2)
    single = continual_metrics([[.5]])
    assert single["AP"] == .5 and single["BWT"] is None and single["FWT"] is None
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[.5, .4]])


# ---------------------------------------------------------------------------------- tasks and memory

def test_tasks_join_files_sample_and_hold_out(task_files, tmp_path):
    config = tiny_config(task_files)
    tasks = load_tasks(config, seed=0)
    assert list(tasks) == ["alpha", "beta", "gamma"]
    for task in tasks.values():
        assert len(task.train) == 12 and len(task.heldout) == 4  # 16 sampled of 20, a quarter held out
        assert not {q.prompt for q in task.train} & {q.prompt for q in task.heldout}
    assert any(q.source.endswith("_2.jsonl:3") or "_2.jsonl" in q.source for q in tasks["alpha"].train + tasks["alpha"].heldout)
    again = load_tasks(config, seed=0)
    assert [q.prompt for q in again["beta"].train] == [q.prompt for q in tasks["beta"].train]
    other = load_tasks(config, seed=1)
    assert [q.prompt for q in other["beta"].train] != [q.prompt for q in tasks["beta"].train]


def test_memory_is_balanced_by_answer_letter():
    questions = [MCQuestion(f"Question {i}?", "ABCD"[i % 4] if i < 20 else "A") for i in range(40)]
    memory = select_memory(questions, 8, seed="s")
    assert len(memory) == 8 and sorted(q.label for q in memory) == list("AABBCCDD")
    assert [q.prompt for q in memory] == [q.prompt for q in select_memory(questions, 8, seed="s")]
    few = select_memory(questions[:3], 8, seed="s")
    assert len(few) == 3


@pytest.mark.parametrize("overrides, problem", [
    (dict(memory_per_task=7), "at least 8"),
    (dict(methods=["ft", "si"]), "methods must be"),
    (dict(ewc_decay=1.5), "ewc_decay"),
    (dict(heldout_fraction=1.0), "heldout_fraction"),
    (dict(tasks=["no-equals-sign"]), "NAME=FILE"),
    (dict(rkif_rule="soft"), "rkif_rule"),
    (dict(adaptive_reference=0.0), "adaptive_reference"),
    (dict(importance_betas=(0.85, 1.5)), r"\[0, 1\)"),
])
def test_config_validation(task_files, tmp_path, overrides, problem):
    with pytest.raises(ValueError, match=problem):
        tiny_config(task_files, **overrides)


def test_config_fields_all_have_help():
    for f in dataclasses.fields(ContinualConfig):
        assert f.metadata.get("help"), f.name


def test_command_line_options_map_to_the_config(task_files):
    """The continual command's options fill its config, the model options and --resume (one option each)."""
    from cnl_ext.cli import build_parser
    from cnl_ext.cli.settings import ResumeOptions

    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    parser = subparsers["continual"]
    args = parser.parse_args(["--task", task_files["alpha"], "--task", task_files["beta"], "--methods", "ft,kif",
                              "recurrent-kif", "--seeds", "0", "3", "--orders", "alpha,beta", "beta,alpha",
                              "--questions-per-task", "32", "--importance-betas", "0.5", "0.6", "--no-chat-template",
                              "--max-grad-norm", "1.0", "--rkif-rule", "paper", "--resume"])
    config, model = build(ContinualConfig, args, parser), build(ModelOptions, args, parser)
    assert config.tasks == [task_files["alpha"], task_files["beta"]]
    assert config.methods == ["ft", "kif", "recurrent-kif"] and config.seeds == [0, 3]
    assert config.orders == ["alpha,beta", "beta,alpha"] and config.questions_per_task == 32
    assert config.importance_betas == (0.5, 0.6) and model.chat_template is False
    assert config.max_grad_norm == 1.0 and config.rkif_rule == "paper" and build(ResumeOptions, args, parser).resume
    defaults = build(ContinualConfig, parser.parse_args([]), parser)
    assert defaults == ContinualConfig()


# ---------------------------------------------------------------------------------- importance adapter

def test_run_optimizer_keeps_kif_importance_by_the_formula():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    optimizer = task_optimizer(params, lr=1e-2, config=ContinualConfig(backend="torch"), importance="first")
    s = [torch.zeros_like(p) for p in params]
    u = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        with torch.no_grad():  # by hand, from the post-update weights (spec §1.2)
            for p, si, ui in zip(params, s, u):
                imp = (p * p.grad).abs()
                si.mul_(0.85).add_(imp * 0.15)
                ui.mul_(0.85).add_((imp - si).abs() * 0.15)
    for got, si, ui in zip(optimizer.importance_scores(), s, u):
        torch.testing.assert_close(got, si * ui)


def test_recurrent_kif_slots_are_separate():
    """Recurrent-KIF's inner and outer learners keep their EMAs in the optimizer's two slots."""
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = task_optimizer(params, lr=0.0, config=ContinualConfig(backend="torch"), importance="first")
    optimizer.importance_slot = "outer"
    params[0].grad = torch.ones(3)
    optimizer.step()
    inner, outer = optimizer.importance_state("inner"), optimizer.importance_state("outer")
    assert not inner[0][0].any() and outer[0][0].all()
    optimizer.reset_importance("outer")
    assert not optimizer.importance_state("outer")[0][0].any()


# ---------------------------------------------------------------------------------- §7.12 R-KIF schedule

def test_recurrent_kif_schedule(task_files, tmp_path, tokenizer, monkeypatch):
    """Fusion after inner steps Q, 2Q, ...; R outer steps per cycle on the memory touch only the outer
    slot; the inner slot is zero after fusion, the outer one is not; task 1 runs without fusion."""
    config = tiny_config(task_files, methods=["recurrent-kif"], rkif_inner_steps=2, rkif_outer_steps=2,
                         questions_per_task=8, batch_size=2)
    events = []
    real_step, real_fuse = continual._Trainer.step, continual.kif.recurrent_fuse_

    def step(self, optimizer, batch):
        events.append(("step", optimizer.importance_slot if optimizer.importance else "plain", len(batch)))
        return real_step(self, optimizer, batch)

    def fuse(params, anchors, inner_ends, inner, outer, *args, **kwargs):
        assert any(t.any() for t in inner[0]) and any(t.any() for t in outer[0])
        real_fuse(params, anchors, inner_ends, inner, outer, *args, **kwargs)
        events.append(("fuse", inner, outer))

    monkeypatch.setattr(continual._Trainer, "step", step)
    monkeypatch.setattr(continual.kif, "recurrent_fuse_", fuse)
    resets = []
    real_reset = CNLOptimizer.reset_importance

    def reset(self, slot=None):
        resets.append(slot)
        real_reset(self, slot)
        assert not any(t.any() for t in self.importance_state(slot)[0])

    monkeypatch.setattr(CNLOptimizer, "reset_importance", reset)
    model = tiny_model(len(tokenizer))
    run(config, model, tokenizer, tmp_path)
    # task 1: 6 training questions / batch 2 = 3 plain steps, no fusion
    assert [e[1] for e in events[:3]] == ["plain"] * 3
    rest = events[3:]
    # tasks 2 and 3: 3 inner steps each; one cycle after the 2nd inner step: 2 outer steps, then fusion
    pattern = [("step", "inner"), ("step", "inner"), ("step", "outer"), ("step", "outer"), ("fuse",),
               ("step", "inner")]
    assert [e[:2] if e[0] == "step" else e[:1] for e in rest] == pattern * 2
    fused = [e for e in rest if e[0] == "fuse"]
    assert resets == ["inner", "inner"]  # after each fusion, only the inner slot
    assert all(any(t.any() for t in e[2][0]) for e in fused)  # the outer slot keeps its values


# ---------------------------------------------------------------------------------- end to end

def test_every_method_end_to_end(task_files, tmp_path, tokenizer):
    config = tiny_config(task_files, questions_per_task=8, batch_size=3, rkif_inner_steps=1)
    model = tiny_model(len(tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = run(config, model, tokenizer, tmp_path / "out")
    assert [r.method for r in records] == list(CONTINUAL_METHODS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored afterwards
    for r in records:
        assert len(r.matrix) == 3 and all(len(row) == 3 for row in r.matrix)
        assert all(0 <= x <= 1 for row in r.matrix for x in row)
        assert all(len(row) == 3 for row in r.heldout_matrix)
        assert r.base == records[0].base  # every method starts from the same model
        m = r.metrics()
        assert m["BWT"] is not None and m["FWT_gem"] is not None and m["heldout_AP"] is not None
    changed = {r.method for r in records if r.matrix[-1] != r.base}
    assert len(changed) >= 4  # training at lr 3e-3 moves the answers of most methods
    notes = {r.method: r.notes for r in records}
    assert notes["kif"][0] == "" and "fusion" in notes["kif"][1]
    assert "fusion" in notes["kif-lora"][2] and "fusion cycles" in notes["recurrent-kif"][1]
    for method in ("kore", "corda"):  # a fresh adapter per task from the earlier tasks' memory; task 1: plain LoRA
        infos = {r.method: r.adapters for r in records}[method]
        assert "(no memory yet)" in notes[method][0] and infos[0]["method"] == "lora" and infos[0]["memory"] == 0
        assert [i["memory"] for i in infos[1:]] == [6, 12]  # 6 memory questions a task
        assert all(i["method"] == method for i in infos[1:])
        assert all(i["init_max_abs_dlogits"] < 1e-5 for i in infos[1:]) and "outputs moved" in notes[method][2]
    assert {r.method: r.adapters for r in records}["ft"] == []
    out = tmp_path / "out"
    for name in ("matrices.csv", "summary.csv", "results.json", "tables.md", "comparison.png"):
        assert (out / name).stat().st_size > 0, name
    for method in CONTINUAL_METHODS:
        assert (out / f"heatmap_{method}.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    n = len(CONTINUAL_METHODS)
    assert len(rows) == n and {row["method"] for row in rows} == set(CONTINUAL_METHODS)
    assert len(list(csv.DictReader(open(out / "matrices.csv")))) == n * 4 * 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["task_sizes"]["0"]["alpha"] == {"train": 6, "heldout": 2}
    assert "| kif-lora | 1 |" in (out / "tables.md").read_text()


def test_orders_seeds_and_resume(task_files, tmp_path, tokenizer):
    config = tiny_config(task_files, methods=["ft"], questions_per_task=6,
                         batch_size=3, orders=["alpha,beta,gamma", "gamma,alpha,beta"], seeds=[0, 1])
    model = tiny_model(len(tokenizer))
    records = run(config, model, tokenizer, tmp_path / "out")
    assert [(r.seed, r.order[0], r.method) for r in records] == [
        (s, first, "ft") for s in (0, 1) for first in ("alpha", "gamma")]
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 4
    assert records[0].base != records[2].base or records[0].matrix != records[2].matrix  # seeds pick other questions
    # resume: every run is read back, nothing is trained again
    resumed = run(config, model, tokenizer, tmp_path / "out", resume=True)
    assert [r.matrix for r in resumed] == [r.matrix for r in records]
    with pytest.raises(ValueError, match="other settings.*epochs"):
        run(dataclasses.replace(config, epochs=2), model, tokenizer, tmp_path / "out", resume=True)
    with pytest.raises(ValueError, match="not a permutation"):
        run(dataclasses.replace(config, orders=["alpha,beta"]), model, tokenizer, tmp_path / "out")


def test_runs_saved_before_the_adaptive_default_continue_with_it_off(task_files, tmp_path, tokenizer):
    """Runs saved when one reference per epoch was the default carry no adaptive_reference: they continue
    with ``--adaptive-reference off``, and at the new default the refusal names the setting."""
    off = tiny_config(task_files, methods=["ft"], questions_per_task=6, batch_size=3, adaptive_reference=None)
    model = tiny_model(len(tokenizer))
    records = run(off, model, tokenizer, tmp_path / "out")
    saved = json.loads(next((tmp_path / "out" / "runs").iterdir()).read_text())
    assert "adaptive_reference" not in saved["settings"] and "epochs" in saved["settings"]
    with pytest.raises(ValueError, match="other settings \\(adaptive_reference\\)"):
        run(dataclasses.replace(off, adaptive_reference=DEFAULT_TOLERANCE), model, tokenizer, tmp_path / "out",
            resume=True)
    assert [r.matrix for r in run(off, model, tokenizer, tmp_path / "out", resume=True)] == [r.matrix for r in records]


def test_one_memory_feeds_replay_cnl_and_recurrent_kif(task_files, tmp_path, tokenizer, monkeypatch):
    """The same memory questions (of the earlier tasks only) reach every method that uses memory."""
    config = tiny_config(task_files, methods=["replay", "cnl", "recurrent-kif"], questions_per_task=8,
                         batch_size=3, rkif_inner_steps=1, rkif_outer_steps=1, adaptive_reference=None)
    tasks = load_tasks(config, seed=0)
    memories = [select_memory(tasks[n].train, config.memory_per_task, f"0:{n}") for n in ("alpha", "beta", "gamma")]
    seen = {"replay": [], "cnl": [], "recurrent-kif": []}
    real_train_task, real_reference = continual._train_task, continual.compute_reference
    real_outer = continual._train_task_recurrent_kif

    def train_task(model, encoder, trainer, params, task, memory, *, method, **kwargs):
        seen[method].append((task.name, [q.prompt for q in memory]))
        return real_train_task(model, encoder, trainer, params, task, memory, method=method, **kwargs)

    references = []

    def compute_reference(optimizer, model, encoder, mastered, *, batch_size):
        references.append([q.prompt for q in mastered])
        return real_reference(optimizer, model, encoder, mastered, batch_size=batch_size)

    outer_batches = []

    def train_recurrent(trainer, params, train, memory, **kwargs):
        real_step = trainer.step

        def step(optimizer, batch):
            if optimizer.importance_slot == "outer":
                outer_batches.append({q.prompt for q in batch})
            return real_step(optimizer, batch)

        trainer.step = step
        try:
            return real_outer(trainer, params, train, memory, **kwargs)
        finally:
            trainer.step = real_step

    monkeypatch.setattr(continual, "_train_task", train_task)
    monkeypatch.setattr(continual, "compute_reference", compute_reference)
    monkeypatch.setattr(continual, "_train_task_recurrent_kif", train_recurrent)
    run(config, tiny_model(len(tokenizer)), tokenizer, tmp_path)
    expected = [[q.prompt for m in memories[:k] for q in m] for k in range(3)]
    for method in seen:
        assert [memory for _, memory in seen[method]] == expected, method
    assert all(len(set(m)) == len(m) for m in expected) and len(expected[2]) == len(memories[0]) + len(memories[1])
    # CNL: one reference per epoch of tasks 2 and 3, over exactly the earlier tasks' memory
    assert references == [expected[1], expected[2]]
    assert outer_batches and all(batch <= set(expected[2]) for batch in outer_batches)


@pytest.mark.parametrize("tolerance", [None, 1e-6, 10.0])
def test_the_reference_schedule_of_a_task(task_files, tmp_path, tokenizer, monkeypatch, tolerance):
    """Per epoch when off (None); adaptive: every step under a tiny tolerance, 1, 2, 4 steps under a huge one."""
    config = tiny_config(task_files, methods=["cnl"], epochs=2, adaptive_reference=tolerance)
    passes = []
    real = continual.compute_reference
    monkeypatch.setattr(continual, "compute_reference", lambda *a, **k: passes.append(1) or real(*a, **k))
    run(config, tiny_model(len(tokenizer)), tokenizer, tmp_path)
    steps = 2 * 3  # per task: 12 training questions, batches of 4, 2 epochs; tasks 2 and 3 have a memory
    expected = {None: 2, 1e-6: steps, 10.0: 3}[tolerance]  # 10.0: steps 0, 1, 3, then an epoch (3) ends the task
    assert len(passes) == 2 * expected


def test_saved_runs_names_only_the_runs_beyond_the_continued_folder(tmp_path):
    """What Ctrl-C keeps (and reports) of a continual command: the runs its staging folder added."""
    staging, finished = tmp_path / ".out.partial", tmp_path / "out"
    assert continual.saved_runs(staging) is None
    for folder, names in ((finished, ["seed0_order0_ft"]), (staging, ["seed0_order0_ft", "seed0_order0_cnl"])):
        (folder / "runs").mkdir(parents=True)
        for name in names:
            (folder / "runs" / f"{name}.json").write_text("{}")
    assert continual.saved_runs(staging) == "2 finished run(s)"
    assert continual.saved_runs(staging, finished) == "1 finished run(s)"
    assert continual.saved_runs(finished, finished) is None
