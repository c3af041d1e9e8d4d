"""End to end: training steps and a whole CNL epoch of a causal LM (issues 3 and 12).

    python bench/end_to_end.py                            # on the GPU, Qwen2.5-1.5B's 28 layers
    python bench/end_to_end.py --device cpu               # on the CPU, SmolLM2-135M, torch and native backends
    python bench/end_to_end.py --device cpu --config tiny --mastered 2 --injection 2   # smoke run

The model has random fp32 weights (transformers' Qwen2ForCausalLM or, for SmolLM2, LlamaForCausalLM
from the published configuration, nothing downloaded) and the prompts are random tokens: an
optimizer's speed does not depend on the values. Batch 1, as in the paper's protocol (spec): the loss is the cross-entropy of
the next token after the prompt against one of four "answer letter" tokens. An epoch is the
reference capture over the mastered set (CNL only) plus one training step per injection sample.

Modes, one after another on the same model (the tiny learning rate barely moves it):

- ``ft_fused``: plain fine-tuning with torch.optim.AdamW(fused=True), no reference;
- ``cnl_authors``: the authors' CNL AdamW loop (cnl_ext/testing/authors_oracle.py); the reference is a full
  fp32 clone of the mean gradient, accumulated one sample at a time, as they do;
- ``cnl_fused``: cnl_ext.FusedCNLAdamW with ``capture_reference()``, once per ``--backend``
  (``cnl_fused@native`` for the second one, and so on): the optimizer step's share of the training
  step before (PyTorch implementation) and after (native kernels).

Writes ``<out>/<gpu-name>-end_to_end.json`` and ``.md``; prints the Markdown.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cnl_ext
from cnl_ext import reference_format
from cnl_ext.experiments.memory import PeakMemory
from cnl_ext.testing.authors_oracle import AuthorsCNL

from bench import harness, report
from bench.shapes import QWEN2_5_1_5B, SMOLLM2_135M, TINY

CONFIGS = {"qwen2.5-1.5b": QWEN2_5_1_5B, "smollm2-135m": SMOLLM2_135M, "tiny": TINY}
MODES = {
    "ft_fused": "plain fine-tuning, torch.optim.AdamW(fused=True)",
    "cnl_authors": "CNL, the authors' loop, fp32 clone of the mean gradient as reference",
    "cnl_fused": "CNL, FusedCNLAdamW with capture_reference()",
}
LETTER_TOKENS = (32, 33, 34, 35)  # "A".."D" in the Qwen2.5 vocabulary; any four ids would do
LR = 1e-7
WEIGHT_DECAY = 0.1  # the paper's AdamW setting
# Defaults by device: the GPU runs issue 3's Qwen2.5-1.5B epoch; the CPU issue 12's SmolLM2 steps,
# few samples (a SmolLM2 forward+backward takes ~0.7 s on 2 cores).
GPU_DEFAULTS = {"config": "qwen2.5-1.5b", "mastered": 64, "injection": 64, "warmup": 2}
CPU_DEFAULTS = {"config": "smollm2-135m", "mastered": 4, "injection": 8, "warmup": 1}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (the GPU if any), cuda, cuda:N or cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="model architecture (default qwen2.5-1.5b on a GPU, smollm2-135m on the CPU; "
                             "tiny: Qwen2 shrunk for smoke runs)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--prompt-tokens", type=int, default=200, help="tokens per prompt")
    parser.add_argument("--mastered", type=int, default=None, help="samples in the mastered set (reference; 64 / 4)")
    parser.add_argument("--injection", type=int, default=None,
                        help="samples in the injection set (training steps; 64 on a GPU, 8 on the CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed samples of each kind before the epoch (2 / 1)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--backend", default=None, type=lambda text: text.split(","),
                        help="comma-separated FusedCNLAdamW backends, one cnl_fused mode each (default: triton on a "
                             "GPU, torch,native on the CPU; a backend unavailable here is skipped with the reason)")
    parser.add_argument("--reference-dtype", choices=reference_format.FORMATS, default="float32",
                        help="FusedCNLAdamW reference_dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory")
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}")
    if min(args.mastered or 1, args.injection or 1) < 1:
        parser.error("--mastered and --injection must be >= 1")
    return args


def build_model(config_name: str, layers: int | None, device: torch.device):
    """Qwen2ForCausalLM for the Qwen2 shapes (q/k/v biases), LlamaForCausalLM for SmolLM2's."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(CONFIGS[config_name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    common = dict(
        vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_key_value_heads"],
        tie_word_embeddings=shape["tie_word_embeddings"], use_cache=False,
    )
    if shape["qkv_bias"]:
        # Qwen2Config has no head_dim or bias switches: it derives head_dim and always has q/k/v biases.
        assert shape["head_dim"] * shape["num_attention_heads"] == shape["hidden_size"]
        model_class, config = Qwen2ForCausalLM, Qwen2Config(**common)
    else:
        model_class, config = LlamaForCausalLM, LlamaConfig(**common, head_dim=shape["head_dim"])
    with torch.device(device):  # initialize on the device: no 6 GB host round trip
        model = model_class(config)
    return model.train()


def make_samples(count: int, prompt_tokens: int, vocab: int, generator, device):
    """Random prompts with random answer letters: ``[(input_ids [1, T], label [1])]``."""
    letters = torch.tensor(LETTER_TOKENS)
    return [
        (torch.randint(vocab, (1, prompt_tokens), generator=generator).to(device),
         letters[torch.randint(len(letters), (1,), generator=generator)].to(device))
        for _ in range(count)
    ]


def sample_loss(model, sample):
    input_ids, label = sample
    # Only the last position's logits are needed: skip the [T, vocab] projection of the others.
    logits = model(input_ids=input_ids, logits_to_keep=1).logits[:, -1]
    return F.cross_entropy(logits.float(), label)


def make_mode(name: str, model, args, backend: str):
    """``(capture(mastered) or None, optimizer_step())`` of one mode, owning its optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "ft_fused":
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        return None, opt.step
    if name == "cnl_authors":
        opt = AuthorsCNL(params, "adamw", lr=LR, weight_decay=WEIGHT_DECAY)
        held = {"reference": None}

        def capture(mastered):
            held["reference"] = None  # the last epoch's reference is dropped before the next is built
            for sample in mastered:
                sample_loss(model, sample).backward()
            held["reference"] = [p.grad.div(len(mastered)) for p in params]  # a new fp32 tensor each
            model.zero_grad(set_to_none=True)

        return capture, lambda: opt.step(held["reference"])
    if name.partition("@")[0] == "cnl_fused":
        opt = cnl_ext.FusedCNLAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, backend=backend,
                                    reference_dtype=args.reference_dtype)

        def capture(mastered):
            opt.clear_reference()  # as above: do not hold two references at once
            with opt.capture_reference() as ref:
                for sample in mastered:
                    ref.backward(sample_loss(model, sample))

        return capture, opt.step
    raise ValueError(f"unknown mode {name!r}")


def now(device) -> float:
    harness.synchronize(device)
    return time.perf_counter()


def run_epoch(model, capture, optimizer_step, mastered, injection, device, desc: str) -> dict:
    """Time one epoch: the reference capture, then a training step per injection sample."""
    model.zero_grad(set_to_none=True)
    start = now(device)
    if capture is not None:
        capture(mastered)
    captured = now(device)
    fwd_bwd, opt_step = [], []
    for sample in tqdm(injection, desc=desc, unit="step", leave=False):
        t0 = now(device)
        sample_loss(model, sample).backward()
        t1 = now(device)
        optimizer_step()
        t2 = now(device)
        model.zero_grad(set_to_none=True)
        fwd_bwd.append(t1 - t0)
        opt_step.append(t2 - t1)
    end = now(device)
    return {
        "capture_s": captured - start if capture is not None else None,  # FT has no reference
        "injection_s": end - captured,
        "epoch_s": end - start,
        "forward_backward_ms": harness.median(fwd_bwd) * 1e3,
        "optimizer_ms": harness.median(opt_step) * 1e3,
        "train_step_ms": harness.median([a + b for a, b in zip(fwd_bwd, opt_step)]) * 1e3,
    }


def run_mode(name, model, mastered, injection, args, backend, device) -> dict:
    """One mode's epoch (after a warmup epoch); ``backend``: FusedCNLAdamW's, for the cnl_fused modes."""
    harness.free_memory(device)
    # absolute peaks: model, grads, states, activations (host RSS always; CUDA's allocator on a GPU)
    with harness.peak_memory(device, baseline=0) as peak, PeakMemory(device) as host:
        capture, optimizer_step = make_mode(name, model, args, backend)
        warm = args.warmup
        if warm:  # lazily created optimizer states, kernel compilation, allocator growth
            run_epoch(model, capture, optimizer_step, mastered[:warm], injection[:warm], device, f"{name} warmup")
        result = run_epoch(model, capture, optimizer_step, mastered, injection, device, name)
        del capture, optimizer_step
    harness.free_memory(device)
    description = MODES[name.partition("@")[0]]
    if name.startswith("cnl_fused"):
        description += f' (backend="{backend}")'
    return {"mode": name, "description": description, "backend": backend if name.startswith("cnl_fused") else None,
            **result, "optimizer_share": result["optimizer_ms"] / result["train_step_ms"],
            "peak_memory_bytes": peak["bytes"], "peak_rss_bytes": host.host,
            "peak_rss_scope": host.scope}


def speedups(rows: dict) -> list[tuple[str, float]]:
    """``(what, ratio)`` pairs; each label says which time is divided by which."""
    out = []
    fused_modes = [name for name in rows if name.startswith("cnl_fused")]
    for name in fused_modes:
        fused, label = rows[name], f"FusedCNLAdamW (backend {rows[name]['backend']!r})"
        if "cnl_authors" in rows:
            authors = rows["cnl_authors"]
            out.append((f"CNL epoch speed-up, authors' loop time / {label} time", authors["epoch_s"] / fused["epoch_s"]))
            out.append((f"CNL optimizer step speed-up, authors' loop time / {label} time",
                        authors["optimizer_ms"] / fused["optimizer_ms"]))
        if "ft_fused" in rows:
            out.append((f"CNL training step cost, {label} training step time / plain FT (torch fused AdamW) "
                        "training step time", fused["train_step_ms"] / rows["ft_fused"]["train_step_ms"]))
            out.append((f"optimizer step, {label} / torch fused AdamW", fused["optimizer_ms"] / rows["ft_fused"]["optimizer_ms"]))
    return out


def markdown(result: dict) -> str:
    env, setup = result["environment"], result["setup"]
    lines = [f"# End-to-end CNL benchmark: {env['device']}", ""]
    lines += report.environment_lines(env)
    lines += [
        f"- model: `{setup['config']}` architecture ({setup['model_class']}), {setup['layers']} layers, "
        f"{setup['parameters']:,} parameters, random fp32 weights",
        f"- batch 1, {setup['prompt_tokens']}-token prompts; epoch = reference over {setup['mastered']} mastered "
        f"samples + {setup['injection']} injection steps (after {setup['warmup']} warmup samples of each)",
        f"- FusedCNLAdamW backends `{'`, `'.join(setup['backends'])}`, reference_dtype `{setup['reference_dtype']}`; "
        f"AdamW lr {LR:g}, weight decay {WEIGHT_DECAY:g}",
        "- step times are medians over the injection steps; optimizer share = optimizer ms / train step ms; "
        "peak memory is the absolute GPU peak of the mode (CUDA max_memory_allocated), peak RSS the host's "
        "resident set high-water mark during the mode (VmHWM, reset at its start)",
        "",
    ]
    header = ["mode", "what", "reference s", "injection s", "epoch s", "fwd+bwd ms", "optimizer ms",
              "train step ms", "optimizer share", "peak memory GiB", "peak RSS GiB"]
    body = [
        [f"`{row['mode']}`", row["description"], report.fmt(row["capture_s"], ".3f"), f"{row['injection_s']:.3f}",
         f"{row['epoch_s']:.3f}", f"{row['forward_backward_ms']:.2f}", f"{row['optimizer_ms']:.2f}",
         f"{row['train_step_ms']:.2f}", f"{row['optimizer_share']:.1%}",
         report.fmt(report.gib(row["peak_memory_bytes"])), report.fmt(report.gib(row.get("peak_rss_bytes")))]
        for row in result["modes"].values()
    ]
    lines += report.markdown_table(header, body)
    for name, reason in result["skipped"].items():
        lines.append(f"\n- `{name}` skipped: {reason}")
    lines += [""] + [f"- {what}: **{value:.2f}×**" for what, value in result["speedups"]]
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = harness.resolve_device(args.device)
    for key, value in (GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    backends = args.backend or (["triton"] if device.type == "cuda" else ["torch", "native"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    env = harness.environment(device, harness.command_line("bench/end_to_end.py", argv))

    torch.manual_seed(args.seed)
    model = build_model(args.config, args.layers, device)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    mastered = make_samples(args.mastered, args.prompt_tokens, vocab, generator, device)
    injection = make_samples(args.injection, args.prompt_tokens, vocab, generator, device)

    # cnl_fused runs once per backend: cnl_fused, cnl_fused@<second backend>, ...
    runs = []
    for name in args.modes.split(","):
        if name == "cnl_fused":
            runs += [(name if i == 0 else f"{name}@{b}", b) for i, b in enumerate(backends)]
        else:
            runs.append((name, None))
    rows, skipped = {}, {}
    with harness.frozen_heap():
        for name, backend in runs:
            reason = backend and harness.backend_unavailable_reason(backend, device)
            if reason:
                skipped[name] = reason
                print(f"{name}: skipped, {reason}", file=sys.stderr)
                continue
            rows[name] = run_mode(name, model, mastered, injection, args, backend, device)
    result = {
        "environment": env,
        "setup": {"config": args.config, "layers": model.config.num_hidden_layers,
                  "parameters": sum(p.numel() for p in model.parameters()), "prompt_tokens": args.prompt_tokens,
                  "mastered": args.mastered, "injection": args.injection, "warmup": args.warmup,
                  "model_class": type(model).__name__, "backends": backends,
                  "reference_dtype": args.reference_dtype, "lr": LR, "weight_decay": WEIGHT_DECAY},
        "modes": rows,
        "skipped": skipped,
        "speedups": speedups(rows),
    }
    if env["cpu"] is not None:
        env["cpu"]["load_average_after"] = harness.cpu_info()["load_average"]
    stem = harness.file_stem(device) + "-end_to_end"
    report.write_outputs(args.out, stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
