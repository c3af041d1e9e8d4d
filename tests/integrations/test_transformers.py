"""CNLTrainer (Hugging Face Trainer) and PEFT LoRA adapters, on a tiny random Llama, CPU."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cnl_ext  # noqa: E402
from cnl_ext.integrations.transformers import CNLTrainer  # noqa: E402

VOCAB, SEQ = 48, 6


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


class _Tokens(torch.utils.data.Dataset):
    """Fixed-length random token sequences (no padding), labels = inputs (causal LM)."""

    def __init__(self, n, seed):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.ids[i]}


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                    gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=5e-3, weight_decay=0.1,
                    adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, lr_scheduler_type="constant",
                    max_grad_norm=0.0, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                    report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


class _CountingTrainer(CNLTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference_steps = []

    def compute_reference(self):
        self.reference_steps.append(self.state.global_step)
        super().compute_reference()


def _mean_gradient(model, dataset):
    """The mean per-sample loss gradient over ``dataset``, one sample at a time (the authors' way)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(dataset)):
        batch = {k: v[None] for k, v in dataset[i].items()}
        for t, g in zip(total, torch.autograd.grad(model(**batch).loss, params)):
            t += g / len(dataset)
    return params, total


def test_the_optimizer_comes_from_the_training_arguments_with_no_decay_groups(tmp_path):
    model = _tiny_llama()
    trainer = CNLTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(8, 1), mastered_dataset=_Tokens(5, 2))
    opt = trainer.create_optimizer()
    assert isinstance(opt, cnl_ext.FusedCNLAdamW) and opt.track_stats
    decay, no_decay = opt.param_groups
    names = {p: n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[p] for p in no_decay["params"]) and no_decay["params"]
    assert all("norm" not in names[p] for p in decay["params"])
    assert (decay["lr"], decay["betas"], decay["eps"]) == (5e-3, (0.8, 0.95), 1e-7)


def test_the_reference_is_the_mean_per_sample_gradient_over_the_mastered_set(tmp_path):
    model, mastered = _tiny_llama(), _Tokens(5, 2)  # batches of 2, 2, 1: weighted by size
    trainer = CNLTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(8, 1), mastered_dataset=mastered)
    opt = trainer.create_optimizer()
    trainer.compute_reference()
    assert all(p.grad is None for p in model.parameters())  # the training gradients are untouched
    for p, expected in zip(*_mean_gradient(model, mastered)):
        torch.testing.assert_close(opt._references[p], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("scale", [2.0**16, 1e38], ids=["scaled", "overflows-then-unscaled"])
def test_fp16_reference_is_loss_scaled_and_retried_unscaled_on_overflow(tmp_path, scale):
    """With a GradScaler (fp16 training) the reference backward is scaled like training's and the
    scale cancels; a scale that overflows is dropped for an unscaled pass. (CPU has no fp16 Trainer,
    so the scaler is set by hand.)"""
    model, mastered = _tiny_llama(), _Tokens(5, 2)
    trainer = CNLTrainer(model=model, args=_args(tmp_path), train_dataset=_Tokens(8, 1), mastered_dataset=mastered)
    opt = trainer.create_optimizer()
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    scales = []
    capture = trainer._capture_reference
    trainer._capture_reference = lambda loss_scale: (scales.append(loss_scale), capture(loss_scale))
    trainer.compute_reference()
    assert scales == ([scale] if scale < 1e30 else [scale, 1.0])
    for p, expected in zip(*_mean_gradient(model, mastered)):
        torch.testing.assert_close(opt._references[p], expected, rtol=1e-4, atol=1e-7)


def test_cnl_trainer_equals_the_hand_written_cnl_loop(tmp_path):
    """Two epochs, gradient accumulation 2, reference at each epoch start: as written out by hand."""
    train_set, mastered = _Tokens(8, 1), _Tokens(4, 2)
    trainer = _CountingTrainer(model=_tiny_llama(), args=_args(tmp_path), train_dataset=train_set,
                               mastered_dataset=mastered, cnl_backend="torch")
    trainer.train()
    assert trainer.reference_steps == [0, 2]  # the start of each epoch (2 optimizer steps an epoch)
    shares = [log["cnl_collaborative_share"] for log in trainer.state.log_history if "cnl_collaborative_share" in log]
    assert len(shares) == 4 and all(0 < s < 1 for s in shares)

    model = _tiny_llama()
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    opt = cnl_ext.FusedCNLAdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": [p for n, p in model.named_parameters() if "norm" in n], "weight_decay": 0.0}],
                                lr=5e-3, betas=(0.8, 0.95), eps=1e-7, backend="torch")
    for _ in range(2):
        model.eval()
        opt.set_reference(dict(zip(*_mean_gradient(model, mastered))))
        model.train()
        for start in range(0, len(train_set), 4):  # one optimizer step = 2 micro-batches of 2
            opt.zero_grad()
            for micro in (start, start + 2):
                batch = {k: torch.stack([train_set[i][k] for i in (micro, micro + 1)]) for k in ("input_ids", "labels")}
                (model(**batch).loss / 2).backward()
            opt.step()
    for (name, p), q in zip(trainer.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_reference_every_n_steps_lr_schedule_and_bf16_autocast(tmp_path):
    args = _args(tmp_path, num_train_epochs=3, lr_scheduler_type="linear", bf16=True)
    trainer = _CountingTrainer(model=_tiny_llama(), args=args, train_dataset=_Tokens(8, 1),
                               mastered_dataset=_Tokens(4, 2), reference_every=4)
    trainer.train()
    assert trainer.reference_steps == [0, 4]  # 6 optimizer steps
    assert trainer.cnl_optimizer().param_groups[0]["lr"] == 0.0  # the linear schedule ran to its end
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any("cnl_collaborative_share" in log for log in trainer.state.log_history)


def test_bad_trainer_arguments_are_named(tmp_path):
    common = dict(model=_tiny_llama(), args=_args(tmp_path), train_dataset=_Tokens(4, 1))
    with pytest.raises(ValueError, match="mastered_dataset"):
        CNLTrainer(**common)
    with pytest.raises(ValueError, match="reference_every"):
        CNLTrainer(**common, mastered_dataset=_Tokens(2, 2), reference_every=0)


def test_another_optimizer_is_wrapped_in_cnl(tmp_path):
    trainer = CNLTrainer(model=_tiny_llama(), args=_args(tmp_path, num_train_epochs=1), train_dataset=_Tokens(4, 1),
                         mastered_dataset=_Tokens(2, 2), optimizer_cls_and_kwargs=(torch.optim.RMSprop, {"lr": 1e-3}))
    trainer.train()
    assert isinstance(trainer.cnl_optimizer(), cnl_ext.CNL)
    assert isinstance(trainer.cnl_optimizer().optimizer, torch.optim.RMSprop)
    assert trainer.cnl_optimizer().has_reference


# ---------------------------------------------------------------------------------------------- PEFT

def _lora_llama():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(_tiny_llama(), config)
    for name, p in model.named_parameters():  # LoRA starts with B = 0: make the adapters move both factors
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_peft_lora_cnl_masks_the_adapters_only():
    model = _lora_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = cnl_ext.FusedCNLAdamW(trainable, lr=1e-2, backend="torch", track_stats=True)
    mastered, train_set = _Tokens(4, 2), _Tokens(4, 1)
    params, expected = _mean_gradient(model, mastered)
    with opt.capture_reference() as ref:
        ref.backward(model(**_stack(mastered)).loss)  # one batch: equal lengths, so the per-sample mean
    for p, e in zip(params, expected):
        torch.testing.assert_close(opt._references[p], e, rtol=1e-4, atol=1e-7)
    for _ in range(2):
        opt.zero_grad()
        model(**_stack(train_set)).loss.backward()
        opt.step()
    stats = opt.cnl_stats()
    assert stats.total == sum(p.numel() for p in trainable) and 0 < stats.collaborative < stats.total
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def _stack(dataset):
    return {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("input_ids", "labels")}


def test_cnl_trainer_with_a_peft_model_trains_the_adapters(tmp_path):
    model = _lora_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = CNLTrainer(model=model, args=_args(tmp_path, num_train_epochs=1), train_dataset=_Tokens(8, 1),
                         mastered_dataset=_Tokens(4, 2))
    trainer.train()
    opt = trainer.cnl_optimizer()
    assert {id(p) for p in opt._parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(opt._references) and all(p.requires_grad for p in opt._references)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, adapters[n]), n
        else:
            assert torch.equal(p, frozen[n]), n
