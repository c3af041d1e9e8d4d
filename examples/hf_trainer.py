"""Fine-tune a causal LM with CNL through the Hugging Face Trainer (cnl_ext.integrations.transformers).

    python examples/hf_trainer.py                        # tiny random Llama, offline, CPU, < 1 minute
    python examples/hf_trainer.py --model PATH_OR_HUB_ID # a real model (and --gguf-file NAME for GGUF)
    torchrun --nproc_per_node 2 examples/hf_trainer.py   # DDP (gloo on CPU)
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer.py  # the same through accelerate
    torchrun --nproc_per_node 2 examples/hf_trainer.py --deepspeed ds_config.json  # DeepSpeed (docs/integrations.md;
                                                         # on CPU: DS_ACCELERATOR=cpu)

The "mastered" set is what the model should not forget, the "injection" set what it learns. Here
both are toy data: short token sequences (random for the tiny model, a few sentences for a real
one). Prints the mastered loss before and after, and the collaborative share the Trainer logged.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile

import torch
import transformers

from cnl_ext.integrations.transformers import CNLTrainer

SENTENCES = ["The capital of France is Paris.", "Water boils at 100 degrees Celsius.",
             "The Earth orbits the Sun.", "Two plus two is four."]
NEW_FACTS = ["The project is called cnl_ext.", "Its optimizers mask conflicting updates.",
             "The mastered loss should not rise.", "Zero is collaborative."]


class TokenDataset(torch.utils.data.Dataset):
    """Equal-length token sequences; the causal-LM labels are the inputs."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def tiny_llama_and_data(seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed)
    return (model, TokenDataset(torch.randint(0, 128, (16, 12), generator=generator)),
            TokenDataset(torch.randint(0, 128, (32, 12), generator=generator)))


def real_model_and_data(name: str, gguf_file: str | None):
    tokenizer = transformers.AutoTokenizer.from_pretrained(name, gguf_file=gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, torch_dtype=torch.float32)

    def encode(texts):  # the same length for every text, so no padding is needed
        ids = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        length = min(len(x) for x in ids)
        return TokenDataset(torch.tensor([x[:length] for x in ids]))

    return model, encode(SENTENCES), encode(NEW_FACTS)


@torch.no_grad()
def mean_loss(model, dataset) -> float:
    model.eval()
    batch = {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in ("input_ids", "labels")}
    return model(**{k: v.to(model.device) for k, v in batch.items()}).loss.item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a Hugging Face model id or directory (default: a tiny random Llama)")
    parser.add_argument("--gguf-file", help="with --model DIR: the GGUF file in it")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--reference-every", default="epoch", help="'epoch' or a number of optimizer steps")
    parser.add_argument("--bf16", action="store_true", help="mixed precision (autocast to bfloat16)")
    parser.add_argument("--deepspeed", metavar="CONFIG", help="a DeepSpeed config (JSON file) without an optimizer section")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()

    model, mastered, injection = (real_model_and_data(args.model, args.gguf_file) if args.model
                                  else tiny_llama_and_data(seed=0))
    reference_every = args.reference_every if args.reference_every == "epoch" else int(args.reference_every)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = transformers.TrainingArguments(
            output_dir=args.output_dir or scratch, num_train_epochs=args.epochs, learning_rate=args.lr,
            per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=2,
            weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=1, logging_steps=2, save_strategy="no",
            report_to="none", bf16=args.bf16, use_cpu=not torch.cuda.is_available() and not args.deepspeed,
            deepspeed=args.deepspeed, seed=0)
        trainer = CNLTrainer(model=model, args=training_args, train_dataset=injection, mastered_dataset=mastered,
                             reference_every=reference_every)
        before = (mean_loss(model, mastered), mean_loss(model, injection))
        trainer.train()
        after = (mean_loss(trainer.model, mastered), mean_loss(trainer.model, injection))
    if trainer.is_world_process_zero():
        shares = [log["cnl_collaborative_share"] for log in trainer.state.log_history if "cnl_collaborative_share" in log]
        # one write: under a launcher where every rank thinks it is rank 0 (accelerate on CPU), the ranks'
        # lines share one pipe and must not interleave
        sys.stdout.write(f"mastered loss  {before[0]:.4f} -> {after[0]:.4f}\n"
                         f"injection loss {before[1]:.4f} -> {after[1]:.4f}\n"
                         f"collaborative share of the logged steps: {', '.join(f'{s:.3f}' for s in shares)}\n")
        sys.stdout.flush()
        assert all(math.isfinite(x) for x in before + after)


if __name__ == "__main__":
    main()
