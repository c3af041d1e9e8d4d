"""When CNL's reference is recomputed, and the first-order prediction of the mastered loss (issue 22, part 5)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from cnl_ext.experiments import MCQEncoder, make_demo_questions, per_question_losses  # noqa: E402
from cnl_ext.experiments import protocol  # noqa: E402
from cnl_ext.experiments.checkpoints import RunCheckpoints  # noqa: E402
from cnl_ext.experiments.protocol import EpochRecord, InjectConfig, compute_reference, make_optimizer  # noqa: E402
from cnl_ext.experiments.reference_schedule import ReferenceSchedule, predicted_change  # noqa: E402

from .test_experiments import fast_config, tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    return MCQEncoder(tiny_tokenizer())


@pytest.fixture(scope="module")
def questions():
    return make_demo_questions(16, seed=5)


def _due_steps(schedule, losses, steps):
    """The steps at which ``schedule`` takes a reference, fed ``losses`` in turn and no prediction."""
    taken, losses = [], iter(losses)
    for step in range(steps):
        if schedule.due():
            schedule.refreshed(next(losses))
            taken.append(step)
        schedule.stepped(0.0)
    return taken


def test_a_fixed_period_takes_every_nth_step_whatever_the_loss():
    assert _due_steps(ReferenceSchedule.for_run(steps_per_epoch=5, every=None, tolerance=None), [9.0] * 9, 12) == [0, 5, 10]
    assert _due_steps(ReferenceSchedule.for_run(steps_per_epoch=5, every=2, tolerance=None), [1.0] * 9, 7) == [0, 2, 4, 6]


def test_the_adaptive_period_halves_on_a_departure_and_doubles_back_up_to_its_bound():
    schedule = ReferenceSchedule.for_run(steps_per_epoch=8, every=None, tolerance=0.1)
    assert (schedule.period, schedule.max_period) == (1, 8)
    # Flat losses, no departure: 1, 2, 4, 8, then 8 (the bound: an epoch).
    assert _due_steps(schedule, [1.0] * 9, 24) == [0, 1, 3, 7, 15, 23]
    assert [i["period"] for i in schedule.intervals] == [2, 4, 8, 8, 8]
    # A rise of 0.3 over a prediction of -0.1: departure 0.4 > 0.1, the period halves.
    schedule.stepped(-0.1)
    schedule.refreshed(schedule.loss + 0.3)
    assert schedule.period == 4 and schedule.intervals[-1] == dict(steps=2, measured=pytest.approx(0.3),
                                                                   predicted=-0.1, period=4)
    # Between tol/4 and tol: the period stays.
    schedule.stepped(0.0)
    schedule.refreshed(schedule.loss + 0.05)
    assert schedule.period == 4
    for _ in range(5):  # never below one step
        schedule.stepped(0.0)
        schedule.refreshed(schedule.loss + 1.0)
    assert schedule.period == 1


def test_the_schedule_round_trips_and_refuses_bad_settings():
    schedule = ReferenceSchedule.for_run(steps_per_epoch=6, every=4, tolerance=0.02)
    _due_steps(schedule, [1.0, 1.2, 1.1, 1.0], 5)
    copy = ReferenceSchedule(1)
    copy.load_state_dict(schedule.state_dict())
    assert copy == schedule and copy.max_period == 4
    with pytest.raises(ValueError, match="period"):
        ReferenceSchedule(0)
    with pytest.raises(ValueError, match="tolerance"):
        ReferenceSchedule(1, tolerance=0.0)
    with pytest.raises(ValueError, match="adaptive_reference"):
        InjectConfig(adaptive_reference=-1.0)


@pytest.mark.parametrize("name, lr", [("sgd", 1e-4), ("momentum", 1e-4), ("adamw", 1e-6)])
def test_the_predicted_change_is_the_measured_one_to_first_order(encoder, questions, name, lr):
    """One CNL step at a small rate: the mastered loss moves by −lr·Σ_collaborative r·u, never up."""
    model = tiny_model(len(encoder.tokenizer), seed=1).double()
    mastered, injection = questions[:8], questions[8:10]
    config = InjectConfig(optimizer=name, lr=lr, weight_decay=0.1, backend="torch")
    optimizer = make_optimizer(config, list(model.parameters()), track_stats=True)
    before = compute_reference(optimizer, model, encoder, mastered, batch_size=8, max_tokens=None, checkpoint=False)
    optimizer.zero_grad()
    per_question_losses(model, encoder, injection).mean().backward()
    optimizer.step()
    predicted = predicted_change(optimizer, optimizer.cnl_stats())
    with torch.no_grad():
        measured = per_question_losses(model, encoder, mastered).mean().item() - before
    assert predicted < 0
    assert measured == pytest.approx(predicted, rel=0.03)


def test_injection_records_the_mastered_loss_against_its_prediction(encoder, questions, monkeypatch, capsys):
    calls = []
    real = protocol.compute_reference
    monkeypatch.setattr(protocol, "compute_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(train=questions[:6], reference=questions[6:10], eval_injection=questions[:6],
                  eval_mastered=questions[6:10])
    runs = {}
    for method, config in [("ft", fast_config(epochs=2)), ("cnl", fast_config(epochs=2, adaptive_reference=0.02))]:
        calls.clear()
        runs[method] = protocol.run_injection(tiny_model(len(encoder.tokenizer)), encoder, method=method,
                                              config=config, **common)
        runs[method].calls = len(calls)
    ft, cnl = runs["ft"], runs["cnl"]
    assert ft.calls == 0 and all(e.reference_passes is None and e.predicted_change is None for e in ft.epochs)
    assert sum(e.reference_passes for e in cnl.epochs[1:]) == cnl.calls >= 3  # 1, 2, 4 steps: three in epoch 1
    # every interval but the open last one, as results.json has it
    assert ft.reference_intervals is None and len(cnl.reference_intervals) == cnl.calls - 1
    assert sum(i["steps"] for i in cnl.reference_intervals) < 2 * 6 and cnl.reference_intervals[0]["steps"] == 1
    assert protocol.RunResult.from_dict(json.loads(json.dumps(cnl.to_dict()))) == cnl
    assert all(e.predicted_change is not None and e.predicted_change <= 0 for e in cnl.epochs[1:])
    model = tiny_model(len(encoder.tokenizer))
    with torch.no_grad():
        start_loss = per_question_losses(model, encoder, common["eval_mastered"]).mean().item()
    assert cnl.epochs[0].mastered_loss == pytest.approx(start_loss, rel=1e-5)
    departure = cnl.epochs[1].departure(cnl.epochs[0])
    assert departure == pytest.approx(cnl.epochs[1].mastered_loss - start_loss - cnl.epochs[1].predicted_change)
    # out of set, the evaluated mastered questions are not the reference's: no comparison
    other = protocol.run_injection(tiny_model(len(encoder.tokenizer)), encoder, method="cnl",
                                   config=fast_config(epochs=1), **dict(common, eval_mastered=questions[10:14]))
    assert other.final.predicted_change is None and other.final.mastered_loss is not None


def test_a_departure_beyond_the_tolerance_is_said(encoder, questions, capsys):
    config = fast_config(epochs=1, lr=0.3, optimizer="sgd")  # far beyond first order
    run = protocol.run_injection(tiny_model(len(encoder.tokenizer)), encoder, method="cnl", config=config,
                                 train=questions[:6], reference=questions[6:10], eval_injection=questions[:6],
                                 eval_mastered=questions[6:10])
    departure = run.final.departure(run.epochs[0])
    out = capsys.readouterr().out
    said = "beyond the first-order range" in out or "aged out of its first-order range" in out
    assert said == (departure > 0.02)
    assert said, f"the departure {departure} was expected beyond 0.02 at lr 0.3"
    rose = run.final.mastered_loss > run.epochs[0].mastered_loss
    assert ("aged out" in out) == rose and ("did not rise" in out) == (not rose)


def test_a_loss_that_fell_less_than_predicted_is_not_called_a_rise():
    fell = protocol._departure_note("adamw CNL epoch 1", -0.30, 0.21, 0.02, 6, adaptive=True)
    assert "changed by -0.0900" in fell and "did not rise" in fell and "aged out" not in fell
    rose = protocol._departure_note("adamw CNL epoch 1", -1.24, 1.87, 0.02, 1, adaptive=False)
    assert "changed by +0.6300" in rose and "aged out" in rose and rose.endswith("--adaptive-reference keeps it fresh")


def test_an_adaptive_run_resumes_to_the_same_numbers(encoder, questions, tmp_path, monkeypatch):
    common = dict(method="cnl", config=fast_config(epochs=3, adaptive_reference=0.05), train=questions[:5],
                  reference=questions[5:9], eval_injection=questions[:5], eval_mastered=questions[5:9])
    whole = protocol.run_injection(tiny_model(len(encoder.tokenizer)), encoder, **common)
    checkpoints = RunCheckpoints(tmp_path)
    real = protocol._learned_and_forgot
    evaluations = []

    def interrupt_in_epoch_2(*args):
        evaluations.append(1)
        if len(evaluations) == 3:  # epoch 0, epoch 1, then stop before epoch 2 is recorded
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(protocol, "_learned_and_forgot", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        protocol.run_injection(tiny_model(len(encoder.tokenizer)), encoder, checkpoints=checkpoints, **common)
    monkeypatch.setattr(protocol, "_learned_and_forgot", real)
    resumed = protocol.run_injection(tiny_model(len(encoder.tokenizer), seed=7), encoder, checkpoints=checkpoints,
                                     **common)

    def numbers(run):
        return [dataclasses.replace(e, wall_s=0.0) for e in run.epochs]

    assert numbers(resumed) == numbers(whole) and resumed.reference_intervals == whole.reference_intervals
    assert [e.reference_passes for e in whole.epochs[1:]] != [5, 5, 5], "the period adapted"


def test_epoch_records_saved_before_the_new_fields_still_load():
    old = dict(epoch=1, train_loss=0.5, learned=1, forgot=0, collaborative_share=None, learned_ids=[0],
               forgot_ids=[], wall_s=1.0)
    record = EpochRecord(**old)
    assert record.mastered_loss is None and record.departure(record) is None


def test_statistics_without_a_per_parameter_split_need_one_learning_rate():
    """DeepSpeed's statistics cover flat partitions (``per_parameter`` empty)."""
    from types import SimpleNamespace

    from cnl_ext import CNLStats

    stats = CNLStats(collaborative=3, total=4, sum_s_collaborative=2.0, sum_s_conflicting=-1.0)
    one_rate = SimpleNamespace(param_groups=[dict(lr=0.1, params=[0, 1]), dict(lr=0.1, params=[2])])
    assert predicted_change(one_rate, stats) == pytest.approx(-0.2)
    two_rates = SimpleNamespace(param_groups=[dict(lr=0.1, params=[0]), dict(lr=0.2, params=[1])])
    with pytest.raises(ValueError, match="per-parameter"):
        predicted_change(two_rates, stats)
