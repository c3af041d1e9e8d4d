"""The reference pass's memory and time by token budget and activation checkpointing (issue 23).

    PYTHONPATH=. python bench/reference_memory.py --mastered runs/long-prompts/mastered.jsonl \
        --settings 16:none:off 16:512:off 16:2048:on --json OUT.json

Loads the model once (SmolLM2-135M by default, float32) and, for each setting
``BATCH:TOKENS:CHECKPOINTING`` (``TOKENS`` ``none`` = no token budget), takes the mean gradient over
the mastered questions into ``.grad`` with :func:`backward_mean_loss`, as the reference pass does.
For each it reports the exact peak resident set size of the pass (``VmHWM``, reset before it), that
peak above the resident size at its start (activations and the 4 B/param gradient buffer), the
time, and how far its mean gradient is from the first setting's: the largest absolute difference
over every 97th element of every tensor, relative to that sample's largest value, and the
relative difference of the whole gradient's norm.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cnl_ext.experiments import memory
from cnl_ext.experiments.data import read_jsonl
from cnl_ext.experiments.model import MCQEncoder, backward_mean_loss, load_model, token_budget_batches


def parse_setting(text: str) -> dict:
    batch, tokens, ckpt = text.split(":")
    return dict(batch_size=int(batch), max_tokens=None if tokens == "none" else int(tokens), checkpoint=ckpt == "on")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mastered", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--settings", nargs="+", default=["16:none:off", "16:512:off", "16:2048:on"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    questions = read_jsonl(args.mastered)
    model, tokenizer = load_model(args.model, device="cpu")
    encoder = MCQEncoder(tokenizer)
    params = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    lengths = [encoder.token_count(q) for q in questions]
    rows, first_sample, first_norm = [], None, None
    for text in args.settings:
        setting = parse_setting(text)
        model.zero_grad(set_to_none=True)
        batches = token_budget_batches(questions, encoder, batch_size=setting["batch_size"],
                                       max_tokens=setting["max_tokens"])
        start_rss = memory.current_rss_bytes()
        mark = memory.Watermark().start()
        started = time.perf_counter()
        backward_mean_loss(model, encoder, questions, **setting)
        seconds = time.perf_counter() - started
        peak = mark.stop()
        with torch.no_grad():
            sample = torch.cat([p.grad.flatten()[::97].double() for p in params])
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).item()
        if first_sample is None:
            first_sample, first_norm = sample, norm
        row = dict(setting=text, **setting, micro_batches=len(batches),
                   padded_tokens=sum(len(b) * max(encoder.token_count(q) for q in b) for b in batches),
                   peak_rss_bytes=peak, start_rss_bytes=start_rss, peak_above_start_bytes=peak - start_rss,
                   seconds=round(seconds, 1),
                   max_abs_diff_rel=float((sample - first_sample).abs().max() / first_sample.abs().max()),
                   norm_rel_diff=abs(norm - first_norm) / first_norm)
        rows.append(row)
        print(f"{text:>14}: {len(batches)} batches, peak {peak / 2**30:.2f} GiB "
              f"({row['peak_above_start_bytes'] / 2**30:+.2f} above the start), {seconds:.1f} s, "
              f"max |diff| {row['max_abs_diff_rel']:.2e} of max, norm {row['norm_rel_diff']:.2e}", flush=True)
        model.zero_grad(set_to_none=True)
    result = dict(command=" ".join(["python bench/reference_memory.py", *(argv or sys.argv[1:])]),
                  parameters=n_params, questions=len(questions), prompt_tokens=dict(min=min(lengths), max=max(lengths)),
                  threads=torch.get_num_threads(), rows=rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
