"""A long-prompt split from the data on hand, for issue 23's memory measurements.

    PYTHONPATH=. python bench/long_prompts.py --out runs/long-prompts     # mastered.jsonl, injection.jsonl

Deterministic, nothing invented: from the authors' MMLU files for Qwen2.5-1.5B-Instruct
(``/work/shared/data/cnl-paper``, see the spec's "Data on hand"), the questions whose prompt, after
SmolLM2's chat template, is ``--min-tokens`` to ``--max-tokens`` tokens long (default 380–480: the
issue's "~400 tokens"; MMLU's reading-comprehension questions), in file order: the first
``--mastered`` of ``mmlu_correct_*`` become ``mastered.jsonl`` and the first ``--injection`` of
``mmlu_wrong_*`` become ``injection.jsonl``. The split is the authors' (for Qwen2.5), not
SmolLM2's: what is measured here is memory and the reference's mean, which do not depend on
which questions the model happens to know.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnl_ext.experiments.data import read_jsonl, write_jsonl

DATA = Path("/work/shared/data/cnl-paper")
SOURCES = {"mastered": "mmlu_correct_Qwen2.5-1.5B-Instruct.jsonl", "injection": "mmlu_wrong_Qwen2.5-1.5B-Instruct.jsonl"}


def prompt_tokens(tokenizer, question) -> int:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question.prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the authors' JSONL files")
    parser.add_argument("--out", type=Path, required=True, help="folder to write mastered.jsonl and injection.jsonl")
    parser.add_argument("--mastered", type=int, default=16)
    parser.add_argument("--injection", type=int, default=4)
    parser.add_argument("--min-tokens", type=int, default=380)
    parser.add_argument("--max-tokens", type=int, default=480)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from cnl_ext.experiments.model import EMBEDDED_GGUF, embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()), gguf_file=EMBEDDED_GGUF)
    summary = {}
    for side, name in SOURCES.items():
        wanted = getattr(args, side)
        chosen, lengths = [], []
        for question in read_jsonl(args.data / name):
            n = prompt_tokens(tokenizer, question)
            if args.min_tokens <= n <= args.max_tokens:
                chosen.append(question)
                lengths.append(n)
                if len(chosen) == wanted:
                    break
        if len(chosen) < wanted:
            parser.error(f"{name}: only {len(chosen)} prompts of {args.min_tokens}-{args.max_tokens} tokens")
        write_jsonl(args.out / f"{side}.jsonl", chosen)
        summary[side] = dict(source=name, questions=len(chosen), tokens_min=min(lengths), tokens_max=max(lengths),
                             tokens_mean=round(sum(lengths) / len(lengths), 1))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
