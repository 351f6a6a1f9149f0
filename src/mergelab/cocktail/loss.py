"""LM-Cocktail's few-shot loss L(M_i, E_t) for one candidate, decoder or encoder.

Decoder (causal LM): each example ``{"input", "output"}`` is scored as ``input + " " + output``
followed by EOS, counting only the output tokens and EOS; a candidate's loss is the mean over
examples of each example's mean token cross-entropy.

Encoder (embedding model): each example ``{"query", "pos": [...], "neg": [...]}`` contributes
its query, its first positive and its first ``neg_number`` negatives; within a batch every
query is scored against every passage of the batch (in-batch negatives) with cosine / 0.05,
and the loss is the cross-entropy of picking its own positive.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import torch

from mergelab.cocktail.options import LossOptions
from mergelab.errors import MergelabError
from mergelab.evaluate.decoder import example_losses
from mergelab.evaluate.encoder import embed
from mergelab.evaluate.runner import pooling_of
from mergelab.adapters.loading import load_model  # mergelab.loading's, plus adapter candidates
from mergelab.loading import model_params
from mergelab.threads import Threads, use_threads

MODEL_TYPES = ("decoder", "encoder")
LOADER_KIND = {"decoder": "causal", "encoder": "encoder"}


def check_examples(examples: Sequence[dict], model_type: str, neg_number: int = 7, where: str = "examples") -> None:
    """Refuse empty lists, missing keys, non-text values and too few negatives before any model is loaded."""
    if model_type not in MODEL_TYPES:
        raise MergelabError(f"model_type '{model_type}' is not known; use 'decoder' or 'encoder'")
    if not examples:
        raise MergelabError(f"{where}: the example list is empty; give at least one few-shot example "
                            f"(5 is the default)")
    for number, example in enumerate(examples):
        at = f"{where}, example {number}"
        if not isinstance(example, dict):
            raise MergelabError(f"{at}: must be a mapping")
        if model_type == "decoder":
            _check_decoder_example(example, at)
        else:
            _check_encoder_example(example, at, neg_number)


def _check_decoder_example(example: dict, at: str) -> None:
    missing = [k for k in ("input", "output") if k not in example]
    if missing:
        raise MergelabError(f"{at} is missing {', '.join(map(repr, missing))} (decoder examples need input and output)")
    for key in ("input", "output"):
        if not isinstance(example[key], str):
            raise MergelabError(f"{at}: '{key}' must be a string, got {example[key]!r}")


def _check_encoder_example(example: dict, at: str, neg_number: int) -> None:
    missing = [k for k in ("query", "pos", "neg") if k not in example]
    if missing:
        raise MergelabError(f"{at} is missing {', '.join(map(repr, missing))} (encoder examples need query, pos "
                            f"and neg)")
    if not isinstance(example["query"], str):
        raise MergelabError(f"{at}: 'query' must be a string, got {example['query']!r}")
    for key in ("pos", "neg"):
        if not isinstance(example[key], list) or not all(isinstance(p, str) for p in example[key]):
            raise MergelabError(f"{at}: '{key}' must be a list of passages (strings)")
    if not example["pos"]:
        raise MergelabError(f"{at} has no positive passage")
    if len(example["neg"]) < neg_number:
        raise MergelabError(f"{at} has {len(example['neg'])} negatives but neg_number is {neg_number}; add negatives "
                            f"or lower neg_number")


def load_candidate(path: str | Path, model_type: str, device: str = "cpu", tokenizer: str | Path | None = None):
    """(model, tokenizer) of one candidate, in float32, in eval mode."""
    return load_model(path, LOADER_KIND[model_type], tokenizer=tokenizer, device=device, what="candidate")


def model_loss(model, tokenizer, examples: Sequence[dict], model_type: str, options: LossOptions, *,
               pooling: str, batch_size: int = 8, device=None) -> float:
    """L(M, E_t) of a loaded model; ``pooling`` is the encoder pooling when ``options`` names none."""
    if model_type == "decoder":
        return decoder_loss(model, tokenizer, examples, batch_size=batch_size, device=device,
                            max_length=options.max_length or 2048)
    return encoder_loss(model, tokenizer, examples, batch_size=batch_size, device=device,
                        pooling=options.pooling or pooling, neg_number=options.neg_number,
                        temperature=options.contrastive_temperature, max_length=options.max_length or 512,
                        query_instruction=options.query_instruction)


def decoder_loss(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 8, max_length: int = 2048,
                 device=None) -> float:
    losses = example_losses(model, tokenizer, examples, batch_size=batch_size, max_length=max_length, device=device)
    return sum(loss for loss, _ in losses) / len(losses)


@torch.no_grad()
def encoder_loss(model, tokenizer, examples: Sequence[dict], *, batch_size: int = 8, neg_number: int = 7,
                 temperature: float = 0.05, pooling: str = "cls", max_length: int = 512,
                 query_instruction: str = "", device=None) -> float:
    total, count = 0.0, 0
    group = 1 + neg_number
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        queries = [query_instruction + e["query"] for e in batch]
        passages = [p for e in batch for p in [e["pos"][0], *e["neg"][:neg_number]]]
        options = dict(pooling=pooling, batch_size=64, max_length=max_length, device=device)
        q = embed(model, tokenizer, queries, **options)  # (B, H), normalized
        p = embed(model, tokenizer, passages, **options)  # (B·group, H)
        scores = q @ p.T / temperature  # (B, B·group)
        targets = torch.arange(len(batch), device=scores.device) * group
        total += float(torch.nn.functional.cross_entropy(scores, targets, reduction="sum"))
        count += len(batch)
    return total / count


def candidate_loss(path: str | Path, examples: Sequence[dict], model_type: str = "decoder", *,
                   options: LossOptions = LossOptions(), batch_size: int = 8, device: str = "cpu",
                   tokenizer: str | Path | None = None, threads: Threads = "auto",
                   previous: "Loaded | None" = None) -> float:
    """Load one candidate, compute its few-shot loss, free it (``threads``: ``mergelab.threads``).

    ``previous``: a ``Loaded`` holder kept across calls: the candidate's weights are then read into
    the previous candidate's model when both have the same config.json and the same tensors
    (``Loaded.load``), instead of building a model again, and the model is kept there for the next."""
    with use_threads(threads, work_params=model_params(path)):
        model, loaded_tokenizer = previous.load(path, model_type, device, tokenizer) if previous is not None \
            else load_candidate(path, model_type, device, tokenizer)
        try:
            return model_loss(model, loaded_tokenizer, examples, model_type, options, pooling=pooling_of(path),
                              batch_size=batch_size, device=device)
        finally:
            del model


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")  # not compared as tokenizer files
NOT_TOKENIZER = ("config.json", "generation_config.json", "README.md", "adapter_config.json")


KEEP_BETWEEN_CALLS_BYTES = 256 * 2**20  # a model this small is kept for the next call (Loaded.put_back)


class Loaded:
    """The last candidate loaded by ``candidate_loss(previous=...)``: its model, tokenizer, and
    what they were built from. Building a transformers model costs more than reading its weights
    (for 27M-parameter decoders, ~0.2 s of ``from_pretrained`` against ~0.03 s of reading), so
    candidates of one architecture (LM-Cocktail's usual case: a base and its fine-tunes) share
    one model, refilled in place (tied weights stay tied).

    Between calls of ``fewshot_losses`` one small model (at most ``KEEP_BETWEEN_CALLS_BYTES`` of
    parameters and buffers) is kept (``take`` / ``put_back``), so that a caller scoring several
    tasks or example sets builds it once; its weights are read from each candidate's files on
    every use, so what is kept is only the built model."""

    _kept: "Loaded | None" = None
    _kept_lock = threading.Lock()

    def __init__(self) -> None:
        self.model = self.tokenizer = None
        self.config: dict | None = None
        self.tensors: dict | None = None  # name -> (shape, dtype) of the checkpoint the model came from
        self.tokenizer_files: dict | None = None
        self.kind = self.device = self.tokenizer_arg = None

    @classmethod
    def take(cls) -> "Loaded":
        """The holder the previous call put back (it is then no longer shared), or a new one."""
        with cls._kept_lock:
            held, cls._kept = cls._kept, None
        return held or Loaded()

    def put_back(self) -> None:
        """Keep this holder for the next ``take`` if its model is small; otherwise let it go."""
        if self.model is None:
            return
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values()) <= KEEP_BETWEEN_CALLS_BYTES:
            with Loaded._kept_lock:
                Loaded._kept = self

    def load(self, path: str | Path, model_type: str, device: str, tokenizer: str | Path | None):
        """(model, tokenizer) of candidate ``path``, as ``load_candidate`` gives them."""
        path = Path(path)
        config, tensors = _plain_checkpoint(path)
        if (self.model is not None and config is not None and config == self.config and tensors == self.tensors
                and (model_type, str(device), tokenizer) == (self.kind, str(self.device), self.tokenizer_arg)):
            if tokenizer is None and _tokenizer_files(path) != self.tokenizer_files:
                from mergelab.loading import check_vocab, load_tokenizer

                self.tokenizer = load_tokenizer(path, what="candidate")
                self.tokenizer_files = _tokenizer_files(path)
                check_vocab(self.model, self.tokenizer, str(path))
            if _refill(self.model, path):
                return self.model, self.tokenizer
        self.model = None  # free the previous model before building the next
        self.model, self.tokenizer = load_candidate(path, model_type, device, tokenizer)
        self.config, self.tensors = config, tensors
        self.tokenizer_files = _tokenizer_files(path) if tokenizer is None else None
        self.kind, self.device, self.tokenizer_arg = model_type, device, tokenizer
        return self.model, self.tokenizer


def _plain_checkpoint(path: Path) -> tuple[dict | None, dict | None]:
    """(config.json, {name: (shape, dtype)}) of a plain safetensors model directory, or
    (None, None) for anything else (adapters, .bin checkpoints): those always load in full."""
    import json

    from mergelab.io import CheckpointReader

    try:
        config = json.loads((path / "config.json").read_text())
        with CheckpointReader(path, label=path.name) as reader:
            if any(info.offsets is None for info in reader.tensors.values()):
                return None, None
            return config, {name: (tuple(info.shape), info.dtype) for name, info in reader.tensors.items()}
    except (MergelabError, OSError, ValueError):
        return None, None


def _tokenizer_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())
            if f.is_file() and not f.name.endswith(WEIGHT_FILES) and f.name not in NOT_TOKENIZER}


@torch.no_grad()
def _refill(model, path: Path) -> bool:
    """Put ``path``'s tensors into ``model`` in place; False (nothing changed) unless every one of
    them has a parameter or buffer of its name and shape there (transformers renames or converts
    some checkpoints' tensors while loading; those are loaded in full).

    A tensor stored in the model's dtype, for a model on the CPU, becomes a copy-on-write view of
    the file's pages (safetensors maps it) instead of a copy: the forward pass reads the page
    cache directly, and the copy (about a quarter of a 27M-parameter candidate's loss time) is
    not paid. The file is never written. The parameter objects stay, so tied weights stay tied."""
    from contextlib import ExitStack

    from safetensors import safe_open

    from mergelab.io import CheckpointReader

    state = model.state_dict(keep_vars=True)
    with CheckpointReader(path, label=path.name) as reader, ExitStack() as files:
        if any(name not in state or tuple(state[name].shape) != tuple(info.shape)
               for name, info in reader.tensors.items()):
            return False
        mapped = {}  # file -> its safe_open handle
        scratch = torch.empty(0, dtype=torch.uint8)  # for tensors stored in another dtype than the model's
        for name, info in reader.tensors.items():
            target = state[name]
            if info.dtype == target.dtype and target.device.type == "cpu":
                if info.file not in mapped:
                    mapped[info.file] = files.enter_context(safe_open(str(info.file), framework="pt"))
                target.data = mapped[info.file].get_tensor(name)
                continue
            if scratch.numel() < target.numel() * info.dtype.itemsize:
                scratch = torch.empty(target.numel() * info.dtype.itemsize, dtype=torch.uint8)
            target.data.copy_(reader.get(name, out=scratch))
    return True
