"""Issue 23: the reference pass's memory bound (token-budget micro-batches, activation checkpointing)
leaves the reference as it is, and every run records its peak memory."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from cnl_ext.optim._base import REFERENCE_KEY  # noqa: E402
from cnl_ext.experiments import InjectConfig, MCQEncoder, compare, compute_reference, make_demo_questions  # noqa: E402
from cnl_ext.experiments import memory, protocol  # noqa: E402
from cnl_ext.experiments.model import backward_mean_loss, checkpointed_layers, token_budget_batches  # noqa: E402
from tests.experiments.test_experiments import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def encoder(tokenizer):
    return MCQEncoder(tokenizer)


@pytest.fixture
def model(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture(scope="module")
def questions():
    return make_demo_questions(12, seed=5)


def _reference(model, encoder, questions, **kwargs):
    params = list(model.parameters())
    optimizer = protocol.make_optimizer(InjectConfig(optimizer="sgd", lr=0.0, backend="torch"), params)
    compute_reference(optimizer, model, encoder, questions, **kwargs)
    tensors = optimizer.state_dict(include_reference=True)[REFERENCE_KEY]["tensors"]
    return [tensors[i].clone() for i in range(len(params))]


def test_token_budget_batches(encoder, questions):
    lengths = [encoder.token_count(q) for q in questions]
    assert token_budget_batches(questions, encoder, batch_size=5, max_tokens=None) == [
        questions[:5], questions[5:10], questions[10:]]
    for budget in (1, max(lengths), 2 * max(lengths) + 1, 10_000):
        batches = token_budget_batches(questions, encoder, batch_size=5, max_tokens=budget)
        assert [q for b in batches for q in b] == questions  # every question once, in order
        for batch in batches:
            width = max(lengths[questions.index(q)] for q in batch)
            assert len(batch) <= 5
            assert len(batch) == 1 or len(batch) * width <= budget  # a prompt over the budget goes alone
    assert all(len(b) == 1 for b in token_budget_batches(questions, encoder, batch_size=5, max_tokens=1))
    assert len(token_budget_batches(questions, encoder, batch_size=5, max_tokens=10_000)) == 3
    with pytest.raises(ValueError, match="max_tokens"):
        token_budget_batches(questions, encoder, batch_size=5, max_tokens=0)


@pytest.mark.parametrize("max_tokens, checkpoint", [(1, False), (50, False), (50, True), (100_000, True)])
def test_reference_is_the_same_mean_for_any_budget(model, encoder, questions, max_tokens, checkpoint):
    """One batch of every question (no budget, no checkpointing) against micro-batches and checkpointing."""
    whole = _reference(model, encoder, questions, batch_size=len(questions), max_tokens=None, checkpoint=False)
    bounded = _reference(model, encoder, questions, batch_size=16, max_tokens=max_tokens, checkpoint=checkpoint)
    scale = max(float(a.abs().max()) for a in whole)
    assert scale > 0
    for a, b in zip(whole, bounded):  # fp32 noise: other batch sums (measured: 4.8e-7 of 1.64)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_checkpointing_gives_the_plain_gradients_and_restores_the_layers(model, encoder, questions):
    model.zero_grad()
    backward_mean_loss(model, encoder, questions, batch_size=4)
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with checkpointed_layers(model):
        assert all("forward" in layer.__dict__ for layer in model.model.layers)
        backward_mean_loss(model, encoder, questions, batch_size=4)
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7)


def test_reference_options_are_validated():
    assert InjectConfig().reference_tokens == protocol.REFERENCE_TOKENS
    assert InjectConfig(reference_tokens=1).reference_tokens == 1
    for bad in (0, -5):
        with pytest.raises(ValueError, match="reference_tokens"):
            InjectConfig(reference_tokens=bad)


def test_reference_tokens_option_on_the_command_line():
    from cnl_ext.cli.parser import build_parser

    parser = build_parser()
    args = parser.parse_args(["inject", "--mastered", "m.jsonl", "--injection", "i.jsonl", "--out", "x",
                              "--reference-tokens", "512", "--no-reference-checkpointing"])
    assert args.reference_tokens == 512 and args.reference_checkpointing is False


def _touch_fresh_pages(size: int) -> None:
    """Raise the RSS by ``size`` for a moment: pages of a new anonymous mapping, each written. (A tensor
    may reuse memory the allocator kept from earlier tests in the same worker, and not raise it.)"""
    import mmap

    chunk = b"\1" * 2**20
    with mmap.mmap(-1, size) as block:
        for _ in range(size // len(chunk)):
            block.write(chunk)


def test_peak_memory_tracker():
    with memory.PeakMemory("cpu") as peak:
        before = memory.current_rss_bytes()
        with peak.phase("big"):
            _touch_fresh_pages(64 * 2**20)
    saved = peak.to_dict()
    assert saved["host_rss_peak_bytes"] >= saved["phases"]["big"]["host_rss_peak_bytes"] > 0
    assert saved["host_rss_process_peak_bytes"] >= saved["host_rss_peak_bytes"]
    if saved["host_rss_peak_scope"] == "run" and before is not None:  # Linux: the phase saw the 64 MiB
        assert saved["phases"]["big"]["host_rss_peak_bytes"] >= before + 60 * 2**20


def test_results_json_records_each_runs_peak_memory(model, encoder, questions, tmp_path):
    from cnl_ext.experiments import write_run_outputs

    config = InjectConfig(optimizer="adam", lr=1e-3, epochs=1, reference_batch_size=4, eval_batch_size=8,
                          backend="torch", reference_tokens=64)
    runs = compare(model, encoder, methods=("ft", "cnl"), optimizers=("adam",), config=config,
                   train=questions[:3], reference=questions[3:9])
    write_run_outputs(tmp_path, runs, title="t", meta={})
    saved = json.loads((tmp_path / "results.json").read_text())
    for run in saved["runs"]:
        peak = run["peak_memory"]
        assert peak["host_rss_peak_bytes"] > 0 and peak["host_rss_peak_scope"] in ("run", "process")
        assert peak["host_rss_process_peak_bytes"] >= peak["host_rss_peak_bytes"]
        assert ("reference" in peak["phases"]) == (run["method"] == "cnl")
    assert protocol.RunResult.from_dict(saved["runs"][1]).peak_memory == saved["runs"][1]["peak_memory"]


def test_nested_trackers_keep_each_others_peaks():
    """A benchmark's watermark around a run's tracker (both reset the kernel's high-water mark)."""
    outer = memory.Watermark().start()
    with memory.PeakMemory("cpu") as inner:
        _touch_fresh_pages(64 * 2**20)
        with inner.phase("after"):  # resets the mark: the outer watermark must still see the 64 MiB
            pass
    peak = outer.stop()
    assert peak >= inner.to_dict()["host_rss_peak_bytes"]
    if inner.scope == "run":
        assert inner.to_dict()["host_rss_peak_bytes"] >= inner.phases["after"]["host_rss_peak_bytes"] + 32 * 2**20
