"""The paper's protocol on a model: split, inject (FT / CNL / replay / LoRA / KORE / CorDA / EWC / A-GEM),
out-of-set (teaching first: :mod:`.teach`).

Everything here works on an in-memory model and lists of :class:`~.data.MCQuestion`; the CNL
optimizers are used only through their public API (``capture_reference``, ``step``,
``cnl_stats``). FT is the same optimizer class with no reference, which equals its torch.optim
counterpart.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import torch

from cnl_ext import functional, reference_format

from .adapters import ADAPTER_METHODS, LORA_METHODS, adapted_model
from .checkpoints import restore_rng_states, rng_states
from .data import split_in_half
from .memory import PeakMemory
from .methods import DEFAULT_EWC_LAMBDA, REFERENCE_METHODS, RULE_METHODS, capture_fisher, optimizer_options
from .model import MCQEncoder, backward_mean_loss, check_trainable, predict, select_trainable
from .options import option
from .progress import bar, epoch_line, note
from .reference_schedule import DEFAULT_TOLERANCE, ReferenceSchedule, predicted_change
from .training import OPTIMIZERS, seeded_batches, train_step
from .training import make_optimizer as optimizer_by_name

__all__ = [
    "OPTIMIZERS", "METHODS", "DEFAULT_LR", "InjectConfig", "EpochRecord", "RunResult", "Split",
    "make_optimizer", "infer_and_split", "compute_reference", "run_injection", "compare",
    "out_of_set", "snapshot", "restore", "backend_choices",
]

METHODS = ("ft", "cnl", "replay", "lora", *ADAPTER_METHODS, *RULE_METHODS)
# SGD / Momentum: the paper's 1e-7. Adam / AdamW: the paper gives no value; 1e-6 is our choice.
DEFAULT_LR = {"sgd": 1e-7, "momentum": 1e-7, "adam": 1e-6, "adamw": 1e-6}
# The reference pass's memory bound (issue 23; bench/README.md "The reference pass's memory").
REFERENCE_TOKENS = 4096
REFERENCE_CHECKPOINTING = True


def backend_choices() -> tuple:
    """The ``backend=`` names the optimizers accept (read from :mod:`cnl_ext.functional` at use)."""
    names = list(functional.BACKENDS)
    aliases = getattr(functional, "BACKEND_ALIASES", None) or getattr(functional, "ALIASES", None) or {}
    return tuple(names + [alias for alias in aliases if alias not in names])


def reference_dtype_choices() -> tuple:
    return tuple(reference_format.FORMATS)


BACKEND_HELP = "implementation of the optimizer step (see: python -m cnl_ext info)"


@dataclass
class InjectConfig:
    """Training: the injection runs (the paper's defaults unless noted)."""

    optimizer: str = option("adamw", "the optimizer", choices=OPTIMIZERS)
    lr: float | None = option(None, "learning rate (default: sgd/momentum 1e-7, the paper's; adam/adamw 1e-6)")
    epochs: int = option(25, "training epochs")
    batch_size: int = option(1, "training batch size (paper: 1)")
    reference_every: int | None = option(None, "the reference's longest period in steps (default: an epoch); with "
                                               "--adaptive-reference off, its fixed period (default: every epoch's "
                                               "start, the paper's)")
    adaptive_reference: float | None = option(
        DEFAULT_TOLERANCE, "adapt the reference's period to TOL (nats of mean mastered loss): start at every step, "
                           "halve the period when the mastered loss rose more than TOL beyond the first-order "
                           "prediction since the last reference, double it (up to --reference-every or an epoch) "
                           "when within TOL/4; off: a fixed period", metavar="TOL")
    momentum: float = option(0.9, "momentum of the 'momentum' optimizer")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam / AdamW betas")
    eps: float = option(1e-8, "Adam / AdamW eps")
    weight_decay: float = option(0.1, "AdamW's decoupled weight decay")
    trainable: str = option("all", "'all' parameters or 'last:N' decoder layers")
    reference_batch_size: int = option(16, "batching of the reference pass (any size gives the same mean)")
    reference_tokens: int | None = option(REFERENCE_TOKENS, "token budget of a reference micro-batch: questions x "
                                          "longest prompt (bounds its memory; any budget gives the same mean; off: none)")
    reference_checkpointing: bool = option(REFERENCE_CHECKPOINTING, "no activation checkpointing in the reference "
                                           "pass (on by default: less memory, one more forward pass over the "
                                           "mastered set)")
    eval_batch_size: int = option(16, "batch size of inference")
    seed: int = option(0, "seed of the training order (the same order for every compared run)", flag="--order-seed")
    backend: str = option("auto", BACKEND_HELP, choices=backend_choices)
    reference_dtype: str = option("float32", "storage of the reference (all give the same mask)",
                                  choices=reference_dtype_choices)
    lora_r: int = option(16, "LoRA rank (methods lora, kore, corda)")
    lora_alpha: int = option(32, "LoRA alpha (methods lora, kore, corda)")
    ewc_lambda: float = option(DEFAULT_EWC_LAMBDA, "EWC's penalty weight λ (method ewc: the gradient gets "
                                                   "2λ·F⊙(θ−θ*), F the Fisher over the mastered set)")

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if self.reference_every is not None and self.reference_every < 1:
            raise ValueError(f"reference_every must be >= 1 steps (or None: every epoch), got {self.reference_every}")
        if self.adaptive_reference is not None and not self.adaptive_reference > 0:
            raise ValueError(f"adaptive_reference must be > 0 (a tolerance in nats), got {self.adaptive_reference}")
        if not self.ewc_lambda >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {self.ewc_lambda}")
        if self.lr is not None and not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.reference_batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("reference_batch_size and eval_batch_size must be >= 1, got "
                             f"{self.reference_batch_size} and {self.eval_batch_size}")
        if self.reference_tokens is not None and self.reference_tokens < 1:
            raise ValueError(f"reference_tokens must be >= 1 tokens (or None: no budget), got {self.reference_tokens}")
        check_trainable(self.trainable)
        self.betas = tuple(self.betas)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr


def make_optimizer(config: InjectConfig, params, *, track_stats: bool = False, **extras):
    """The cnl_ext optimizer for ``config.optimizer`` (plain FT until a reference is set); ``extras``:
    more constructor options (``rule``, ``ewc_lambda``)."""
    return optimizer_by_name(config.optimizer, params, lr=config.learning_rate, momentum=config.momentum,
                             betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                             backend=config.backend, reference_dtype=config.reference_dtype, track_stats=track_stats,
                             **extras)


# ---------------------------------------------------------------------------------- split

@dataclass
class Split:
    """Mastered (answered correctly) and injection (answered wrongly) questions, with predictions."""

    mastered: list
    injection: list
    predictions: list  # predicted letter per input question, in input order
    excluded: list = field(default_factory=list)  # questions in neither set (taught-first: lucky guesses)


def infer_and_split(model, encoder: MCQEncoder, questions, *, batch_size: int = 16) -> Split:
    """Step 1 of the protocol: correct → mastered, wrong → injection."""
    questions = list(questions)
    answers = predict(model, encoder, questions, batch_size=batch_size, desc="infer-and-split")
    correct = answers.correct(questions)
    return Split([q for q, ok in zip(questions, correct) if ok],
                 [q for q, ok in zip(questions, correct) if not ok], answers.letters)


# ---------------------------------------------------------------------------------- weights

def snapshot(model) -> dict:
    """A copy of the weights, to start every compared run from the same model."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def restore(model, weights: dict) -> None:
    model.load_state_dict(weights)


# ---------------------------------------------------------------------------------- training

def compute_reference(optimizer, model, encoder: MCQEncoder, mastered, *, batch_size: int,
                      max_tokens: int | None = REFERENCE_TOKENS, checkpoint: bool = REFERENCE_CHECKPOINTING) -> float:
    """Set the optimizer's reference to the mean gradient over ``mastered``; returns the mean loss.

    ``capture_reference`` averages over its ``backward`` calls, so each batch's summed loss is
    scaled by ``n_batches / |M|``: the result is the mean over questions for any batching.
    ``max_tokens`` (micro-batches of at most that many padded tokens) and ``checkpoint``
    (activation checkpointing) bound the pass's memory; neither changes the mean.
    """
    with optimizer.capture_reference() as ref:
        return backward_mean_loss(model, encoder, mastered, batch_size=batch_size, backward=ref.backward,
                                  mean_over_calls=True, desc="reference", max_tokens=max_tokens, checkpoint=checkpoint)


@dataclass
class EpochRecord:
    """Counts after one epoch (epoch 0: before training)."""

    epoch: int
    train_loss: float | None
    learned: int
    forgot: int
    collaborative_share: float | None  # mean over the epoch's CNL steps
    learned_ids: list  # indices into the evaluated injection questions answered correctly
    forgot_ids: list  # indices into the evaluated mastered questions answered wrongly
    wall_s: float
    mastered_loss: float | None = None  # mean loss over the evaluated mastered questions
    predicted_change: float | None = None  # CNL: the epoch's first-order change of the reference loss
    reference_passes: int | None = None  # reference passes taken in the epoch (methods with a reference)

    def departure(self, previous: "EpochRecord") -> float | None:
        """How far the mastered loss rose beyond the first-order prediction over this epoch (None: unknown)."""
        if None in (self.mastered_loss, previous.mastered_loss, self.predicted_change):
            return None
        return self.mastered_loss - previous.mastered_loss - self.predicted_change


@dataclass
class RunResult:
    """One training run: what was trained how, and its per-epoch records."""

    method: str
    optimizer: str
    lr: float
    n_injection: int  # size of the evaluated injection set (the base of the LEARNED percentage)
    n_mastered: int  # size of the evaluated mastered set (the base of the FORGOT percentage)
    epochs: list
    adapter: dict | None = None  # kore / corda: the output change at init, the trained parameters
    peak_memory: dict | None = None  # memory.PeakMemory.to_dict() of the run (since its resume, if resumed)
    # reference methods: per interval between references, its steps, the measured and the predicted change of
    # the reference loss, and the period chosen after it (ReferenceSchedule.intervals)
    reference_intervals: list | None = None

    @property
    def final(self) -> EpochRecord:
        return self.epochs[-1]

    @property
    def label(self) -> str:
        return f"{self.optimizer} {self.method.upper()}"

    def to_dict(self) -> dict:
        return dict(asdict(self), label=self.label)

    @classmethod
    def from_dict(cls, saved: dict) -> "RunResult":
        fields = {k: v for k, v in saved.items() if k not in ("label", "epochs")}
        return cls(**fields, epochs=[EpochRecord(**e) for e in saved["epochs"]])


def _learned_and_forgot(model, encoder, eval_injection, eval_mastered, batch_size):
    """Indices of the injection questions answered right and of the mastered questions answered wrong,
    and the mean loss over the mastered questions (None for none)."""
    learned = predict(model, encoder, eval_injection, batch_size=batch_size, desc="eval injection").correct(eval_injection)
    mastered = predict(model, encoder, eval_mastered, batch_size=batch_size, desc="eval mastered")
    kept = mastered.correct(eval_mastered)
    mastered_loss = sum(mastered.losses) / len(mastered.losses) if mastered.losses else None
    return [i for i, ok in enumerate(learned) if ok], [i for i, ok in enumerate(kept) if not ok], mastered_loss


def _train_epoch(model, encoder, optimizer, questions, *, batch_size, order_seed, desc, before_step=None,
                 after_step=None):
    """One pass over ``questions`` in a seeded order; returns (mean loss, collaborative shares).
    ``after_step``: called with each step's ``cnl_stats()`` (None when not tracked)."""
    losses, shares = [], []
    steps = bar(seeded_batches(questions, batch_size, order_seed), desc=desc, unit="step")
    for batch in steps:
        if before_step is not None:
            before_step()
        loss = train_step(model, encoder, optimizer, batch)
        stats = optimizer.cnl_stats() if getattr(optimizer, "track_stats", False) else None
        if after_step is not None:
            after_step(stats)
        if stats is not None:
            shares.append(stats.collaborative_share)
        losses.append(loss)
        steps.set_postfix(loss=f"{loss:.4f}")
    return sum(losses) / len(losses), shares


def _departure_note(what: str, predicted: float, departure: float, tolerance: float, passes: int, *,
                    adaptive: bool) -> str:
    """The line that says the mastered loss and its first-order prediction parted ways over an epoch."""
    change = predicted + departure
    said = (f"{what}: the mastered loss changed by {change:+.4f} where the first-order prediction was "
            f"{predicted:+.4f} (departure {departure:+.4f} > {tolerance:g}; {passes} reference pass(es) this epoch): ")
    if change <= 0:  # fell, by less than predicted: the linear model is off, nothing was lost to it
        return said + "the steps went beyond the first-order range, but the loss did not rise"
    return said + "the reference aged out of its first-order range; " + (
        "a smaller --adaptive-reference keeps it fresher" if adaptive else "--adaptive-reference keeps it fresh")


def run_injection(model, encoder: MCQEncoder, *, method: str, config: InjectConfig, train, reference,
                  eval_injection, eval_mastered, checkpoints=None, wrap_training=None) -> RunResult:
    """Train on ``train`` for ``config.epochs`` and count Learned / Forgot after every epoch.

    ``method``: ``ft`` (plain), ``cnl`` (masked against the mean gradient over ``reference``),
    ``replay`` (``train`` plus ``reference``, plain), ``lora`` (plain, LoRA adapters only) or ``kore`` /
    ``corda`` (plain, adapters built from ``reference``: :mod:`.adapters`), ``ewc`` (penalty with the
    Fisher over ``reference``, captured once before training) or ``agem`` (the gradient projected
    against the reference, captured as CNL's): :mod:`.methods`.
    The model's weights change; :func:`compare` restores them between runs.
    ``checkpoints``: a :class:`~.checkpoints.RunCheckpoints`; the run is saved there at the end of
    every epoch and continues from its latest save (same numbers as without the interruption).
    ``wrap_training``: ``(model, optimizer) -> (model, optimizer API, close)`` to train through, e.g.
    a DeepSpeed engine (:class:`~.deepspeed_runs.DeepSpeedTraining`; no checkpoints then).
    """

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    train = list(train) + (list(reference) if method == "replay" else [])
    if not train:
        raise ValueError("nothing to train on: the injection set is empty")
    if method in ("cnl", *RULE_METHODS) and not reference:
        raise ValueError(f"{method.upper()} needs a non-empty mastered (reference) set")
    name = f"{config.optimizer} {method.upper()}"
    key = f"{config.optimizer}-{method}"
    adapters = adapted_model(method, model, encoder, reference, r=config.lora_r, alpha=config.lora_alpha)
    with adapters as (trained_model, adapter_info), PeakMemory(next(model.parameters()).device) as peak:
        if method not in LORA_METHODS:
            select_trainable(model, config.trainable)
        named = {n: p for n, p in trained_model.named_parameters() if p.requires_grad}
        optimizer = make_optimizer(config, list(named.values()), track_stats=method == "cnl",
                                   **optimizer_options(method, ewc_lambda=config.ewc_lambda))
        stepped_model, close = trained_model, None
        if wrap_training is not None:
            if checkpoints is not None:
                raise ValueError("checkpoints are not supported with wrap_training (DeepSpeed)")
            stepped_model, optimizer, close = wrap_training(trained_model, optimizer)
        steps_per_epoch = -(-len(train) // config.batch_size)
        schedule = ReferenceSchedule.for_run(steps_per_epoch=steps_per_epoch, every=config.reference_every,
                                             tolerance=config.adaptive_reference)
        steps_done = 0
        saved = checkpoints.latest(key) if checkpoints is not None else None
        if saved is not None:  # continue after the saved epoch
            unknown = set(saved["trained"]) - set(named)
            if unknown:
                raise ValueError(f"the checkpoint of {name} names parameters this model does not train: "
                                 f"{sorted(unknown)[:3]}")
            with torch.no_grad():
                for n, tensor in saved["trained"].items():
                    named[n].copy_(tensor)
            optimizer.load_state_dict(saved["optimizer"])
            restore_rng_states(saved["rng"])
            records = [EpochRecord(**r) for r in saved["records"]]
            steps_done = saved["steps_done"]
            if "reference_schedule" in saved:
                schedule.load_state_dict(saved["reference_schedule"])
            else:  # saved before the schedule was: a fixed period counted from the first step
                schedule.since, schedule.loss = steps_done % schedule.period, float("nan")
            note(f"{name}: resuming after epoch {saved['epoch']} of {config.epochs}")
        else:
            learned, forgot, mastered_loss = _learned_and_forgot(trained_model, encoder, eval_injection, eval_mastered,
                                                                 config.eval_batch_size)
            records = [EpochRecord(0, None, len(learned), len(forgot), None, learned, forgot, 0.0, mastered_loss)]
            if method == "ewc":  # F and θ* once, before training (saved with the optimizer's state)
                capture_fisher(optimizer, trained_model, encoder, reference)
        start = time.perf_counter() - records[-1].wall_s

        epoch_passes, epoch_predicted = 0, []

        def refresh_reference():
            nonlocal steps_done, epoch_passes
            if method in REFERENCE_METHODS and schedule.due():
                # The last step's gradients (the next step clears them) and the old reference are not
                # needed while the new one is taken: freed first, they do not add to its peak.
                optimizer.zero_grad(set_to_none=True)
                optimizer.clear_reference()
                with peak.phase("reference"):
                    schedule.refreshed(compute_reference(
                        optimizer, stepped_model, encoder, reference, batch_size=config.reference_batch_size,
                        max_tokens=config.reference_tokens, checkpoint=config.reference_checkpointing))
                epoch_passes += 1
            steps_done += 1

        def count_step(stats):
            change = predicted_change(optimizer, stats) if stats is not None else None
            schedule.stepped(change)
            if change is not None:
                epoch_predicted.append(change)

        # The first-order prediction is about the reference set: compared when that set is the evaluated one.
        in_set = list(eval_mastered) == list(reference)
        for epoch in range(records[-1].epoch + 1, config.epochs + 1):
            epoch_passes, epoch_predicted = 0, []
            loss, shares = _train_epoch(stepped_model, encoder, optimizer, train, batch_size=config.batch_size,
                                        order_seed=config.seed * 100_003 + epoch, desc=f"{name} epoch {epoch}",
                                        before_step=refresh_reference, after_step=count_step)
            learned, forgot, mastered_loss = _learned_and_forgot(trained_model, encoder, eval_injection, eval_mastered,
                                                                 config.eval_batch_size)
            share = sum(shares) / len(shares) if shares else None
            records.append(EpochRecord(
                epoch, loss, len(learned), len(forgot), share, learned, forgot, time.perf_counter() - start,
                mastered_loss, sum(epoch_predicted) if epoch_predicted and in_set else None,
                epoch_passes if method in REFERENCE_METHODS else None))
            note(epoch_line(name, epoch, config.epochs, learned=len(learned), n_injection=len(eval_injection),
                            forgot=len(forgot), n_mastered=len(eval_mastered), share=share, loss=loss,
                            elapsed_s=records[-1].wall_s))
            departure = records[-1].departure(records[-2])
            tolerance = config.adaptive_reference or DEFAULT_TOLERANCE
            if departure is not None and departure > tolerance:
                note(_departure_note(f"{name} epoch {epoch}", records[-1].predicted_change, departure, tolerance,
                                     epoch_passes, adaptive=config.adaptive_reference is not None))
            if checkpoints is not None and epoch < config.epochs:
                checkpoints.save_epoch(key, dict(
                    epoch=epoch, steps_done=steps_done, reference_schedule=schedule.state_dict(),
                    records=[asdict(r) for r in records], rng=rng_states(),
                    trained={n: p.detach() for n, p in named.items()},
                    optimizer=optimizer.state_dict(include_reference=True)), label=name, epochs=config.epochs)
        if close is not None:
            close()
        for p in model.parameters():
            p.requires_grad_(True)
    return RunResult(method, config.optimizer, config.learning_rate, len(eval_injection), len(eval_mastered), records,
                     adapter_info, peak.to_dict(), schedule.intervals if method in REFERENCE_METHODS else None)


def compare(model, encoder: MCQEncoder, *, methods, optimizers, config: InjectConfig, train, reference,
            eval_injection=None, eval_mastered=None, lrs: dict | None = None, checkpoints=None,
            wrap_training=None) -> list:
    """Every (optimizer, method) run from the same starting weights (restored afterwards too).

    In-set: ``eval_injection = train`` and ``eval_mastered = reference`` (the defaults).
    ``lrs``: optional learning rate per optimizer name (else ``config.lr`` / the default).
    ``checkpoints``: a :class:`~.checkpoints.RunCheckpoints` to save to and continue from (the
    starting weights are saved there once; finished runs are not run again).
    """
    eval_injection = list(train) if eval_injection is None else eval_injection
    eval_mastered = list(reference) if eval_mastered is None else eval_mastered
    start = snapshot(model) if checkpoints is None else checkpoints.start_weights(model)
    results = []
    try:
        for optimizer in optimizers:
            run_config = replace(config, optimizer=optimizer, lr=(lrs or {}).get(optimizer, config.lr))
            for method in methods:
                key = f"{optimizer}-{method}"
                saved = checkpoints.finished(key) if checkpoints is not None else None
                finished = RunResult.from_dict(saved) if saved is not None else None
                if finished is not None:
                    note(f"{finished.label}: finished before the interruption, not run again")
                    results.append(finished)
                    continue
                restore(model, start)
                result = run_injection(model, encoder, method=method, config=run_config, train=train,
                                       reference=reference, eval_injection=eval_injection,
                                       eval_mastered=eval_mastered, checkpoints=checkpoints,
                                       wrap_training=wrap_training)
                if checkpoints is not None:
                    checkpoints.finish_run(key, result)
                results.append(result)
    finally:
        restore(model, start)
    return results


def out_of_set(model, encoder: MCQEncoder, mastered, injection, *, side: str, methods, optimizers,
               config: InjectConfig, split_seed: int = 0, lrs: dict | None = None, checkpoints=None):
    """The paper's out-of-set runs, splitting one side 1:1 with ``split_seed``.

    ``side="mastered"``: the reference (and replay data) is one half of M, forgetting is counted
    on the other half. ``side="injection"``: train on one half of I, count learning on the other.
    Returns ``(results, halves)`` with the two halves used.
    """
    if side == "mastered":
        seen, unseen = split_in_half(mastered, split_seed)
        kwargs = dict(train=injection, reference=seen, eval_injection=injection, eval_mastered=unseen)
    elif side == "injection":
        seen, unseen = split_in_half(injection, split_seed)
        kwargs = dict(train=seen, reference=mastered, eval_injection=unseen, eval_mastered=mastered)
    else:
        raise ValueError(f"side must be 'mastered' or 'injection', got {side!r}")
    runs = compare(model, encoder, methods=methods, optimizers=optimizers, config=config, lrs=lrs,
                   checkpoints=checkpoints, **kwargs)
    return runs, (seen, unseen)
