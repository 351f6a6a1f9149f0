"""Vocabularies: the output tokenizer, embedding rows aligned by token string, chat templates.

Models fine-tuned from one base often differ only by added tokens (an instruct model's
``<|im_start|>``) or by padding ``vocab_size`` to a multiple of 64. With ``tokenizer_source``
(or mergekit's ``tokenizer:`` block) a merge builds one output vocabulary and maps every
model's embedding rows (input embeddings and an untied lm_head) to it by token string:

* ``base``: the base model's tokenizer (the first model's without ``base_model``);
* ``union``: the base tokenizer plus every other model's tokens it lacks, added in model order
  (special where the model marks them special);
* a path or model: that tokenizer.

Each output row is merged from the models that have its token, with their weights renormalized
over those models (the subset's ``weight`` scaled to the sum of all weights); rows that share
one subset of models are merged in one call of the method. A base-using method needs the base's
row: where the base lacks a token the row is the weighted mean of the experts that have it
(there is no task vector without a base row). A token only one model has takes its row; a
token no model has (a forced new token) starts as the mean of the merged rows. Rows past the
last token (padding to a multiple) come from the same row of the models that pad there, else
the mean. ``tokens: {TOKEN: {source: MODEL}}`` lends MODEL's row to every model without TOKEN
before the usual merge; with ``force: true`` the row is MODEL's, outright (as mergekit).

Chat templates: a built-in name (``BUILTIN_TEMPLATES``), a Jinja string, or ``auto`` (the
template most inputs carry).
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mergelab.errors import MergelabError

TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template",
                   "spiece", "sentencepiece")

NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tensors whose rows are the vocabulary: input embeddings and output heads of the common families.
_VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight",
                  "lm_head.weight", "embed_out.weight", "output.weight")

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% endif %}"
        "{% endfor %}"
    ),
}


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor's rows are indexed by token id (embeddings, untied lm_head)."""
    return name.endswith(_VOCAB_TENSORS)


class ModelTokenizer:
    """One directory's tokenizer, read for its vocabulary and grown by added tokens.

    With a ``tokenizer.json`` it is read and written with the ``tokenizers`` library (fast, and
    no ``transformers`` import on the merge path); otherwise (sentencepiece-only directories)
    through ``transformers.AutoTokenizer``.
    """

    def __init__(self, directory: Path, label: str):
        self.directory, self.label, self.added = Path(directory), label, []
        file = self.directory / "tokenizer.json"
        self.core = self.hf = None
        if file.is_file():
            from tokenizers import Tokenizer

            try:
                self.core = Tokenizer.from_file(str(file))
            except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
                raise MergelabError(f"{label}: {file} is not a valid tokenizer.json ({str(exc)[:160]}); fix or "
                                    f"re-save that tokenizer") from None
        else:
            self.hf = load_tokenizer(self.directory, label)

    def vocab(self) -> dict[str, int]:
        return self.core.get_vocab(with_added_tokens=True) if self.core is not None else self.hf.get_vocab()

    def specials(self) -> set[str]:
        decoder = self.core.get_added_tokens_decoder() if self.core is not None else self.hf.added_tokens_decoder
        return {added.content for added in decoder.values() if added.special}

    def add(self, new: list[str], special: set[str]) -> None:
        """Add ``new`` in order, each run of plain or special tokens in one call."""
        from tokenizers import AddedToken

        start = 0
        while start < len(new):
            kind = new[start] in special
            end = start
            while end < len(new) and (new[end] in special) == kind:
                end += 1
            batch = [AddedToken(t, special=kind, normalized=False) for t in new[start:end]]
            if self.core is not None:
                (self.core.add_special_tokens if kind else self.core.add_tokens)(batch)
            else:
                self.hf.add_tokens(batch, special_tokens=kind)
            self.added += [(t, kind) for t in new[start:end]]
            start = end

    def save(self, target: Path) -> None:
        """Write the tokenizer files into ``target``: the directory's own files, with the added
        tokens in tokenizer.json, tokenizer_config.json's ``added_tokens_decoder`` (where it has
        one) and special_tokens_map.json."""
        for item in self.directory.iterdir():
            if item.is_file() and (item.name.startswith(TOKENIZER_FILES) or item.name == "tokenizer_config.json"):
                shutil.copy2(item, target / item.name)
        if not self.added:
            return
        if self.core is None:
            self.hf.save_pretrained(str(target))
        else:
            self.core.save(str(target / "tokenizer.json"))
            config_path = target / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            if isinstance(config.get("added_tokens_decoder"), dict):
                ids = self.vocab()
                for token, special in self.added:
                    config["added_tokens_decoder"][str(ids[token])] = {
                        "content": token, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": special}
                config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        self._write_special_tokens_map(target)

    def _write_special_tokens_map(self, target: Path) -> None:
        """special_tokens_map.json: the named special tokens (from the directory's map, else its
        tokenizer_config.json) and every other special token as ``additional_special_tokens``."""
        specials_path, config_path = target / "special_tokens_map.json", target / "tokenizer_config.json"
        if specials_path.is_file():
            specials = json.loads(specials_path.read_text())
        else:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
            specials = {key: config[key] for key in NAMED_SPECIALS if isinstance(config.get(key), (str, dict))}
        named = {value if isinstance(value, str) else value.get("content") for key, value in specials.items()
                 if key in NAMED_SPECIALS}
        listed = list(specials.get("additional_special_tokens") or [])
        ids = self.vocab()
        listed += [t for t in sorted(self.specials(), key=ids.get) if t not in named and t not in listed]
        specials["additional_special_tokens"] = listed
        specials_path.write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer(path: Path, label: str):
    """A model directory's tokenizer (transformers, local files only), or one line naming the fix."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MergelabError(f"{label}: cannot load a tokenizer from {path} ({first[:160]}); the vocabulary merge "
                            f"needs each model's tokenizer files") from None


@dataclass
class Vocabulary:
    """The output vocabulary and, per input model, where each output row comes from."""

    tokenizer: ModelTokenizer  # the output tokenizer, saved into the merged directory
    rows: int  # output embedding rows (tokens, then padding)
    row_maps: dict[str, torch.Tensor]  # model ref -> (rows,) int64: that model's row, or -1 where it has none
    forced: dict[int, str] = field(default_factory=dict)  # output row -> model ref whose row is copied
    new_tokens: list[str] = field(default_factory=list)  # tokens no model has: started as the mean row
    filled: dict[int, str] = field(default_factory=dict)  # output row -> model ref lending its row to models without
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def is_identity(self, refs: list[str], row_counts: dict[str, int]) -> bool:
        """Whether every model's rows already are the output rows (nothing to remap)."""
        same = torch.arange(self.rows)
        return all(row_counts[ref] == self.rows and torch.equal(self.row_maps[ref], same) for ref in refs)


def build_vocabulary(mode: str, models: dict[str, Path], base_ref: str, row_counts: dict[str, int],
                     tokens: dict[str, Any] | None = None, pad_to_multiple_of: int | None = None,
                     locate: Callable[[str], Path] | None = None) -> Vocabulary:
    """Plan the output vocabulary.

    Args:
        mode: ``base``, ``union`` or a tokenizer path / model reference (resolved by ``locate``).
        models: every input model: ref -> directory (the base included).
        base_ref: the model whose tokenizer ``base`` and ``union`` start from.
        row_counts: ref -> rows of that model's input embedding.
        tokens: mergekit's ``tokenizer.tokens`` (``TokenSetting`` per token string).
        pad_to_multiple_of: round the output rows up to a multiple of this; by default a base
            whose embedding is padded past its tokens has its padding multiple reproduced.
    """
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise MergelabError(f"tokenizer.pad_to_multiple_of must be a positive number of rows, got {pad_to_multiple_of}")
    tokenizers = {ref: ModelTokenizer(path, f"model '{ref}'") for ref, path in models.items()}
    vocabs = {ref: tok.vocab() for ref, tok in tokenizers.items()}
    for ref, vocab in vocabs.items():
        top = max(vocab.values(), default=-1)
        if top >= row_counts[ref]:
            token = max(vocab, key=vocab.get)
            raise MergelabError(f"model '{ref}': its tokenizer has token {token!r} at id {top} but its embedding has "
                                f"only {row_counts[ref]} rows; the tokenizer does not belong to these weights")
    if mode in ("base", "union"):
        output = ModelTokenizer(models[base_ref], f"model '{base_ref}'")
    else:
        output = ModelTokenizer(locate(mode) if locate else Path(mode), f"tokenizer_source '{mode}'")
    if mode == "union":
        have = set(vocabs[base_ref])
        for ref, tok in tokenizers.items():
            missing = sorted((t for t in vocabs[ref] if t not in have), key=vocabs[ref].get)
            output.add(missing, tok.specials())
            have.update(missing)

    forced: dict[str, str] = {}
    filled: dict[str, str] = {}
    out_vocab = output.vocab()
    for token, setting in (tokens or {}).items():
        source = getattr(setting, "source", None)
        if source is not None:
            if source not in vocabs:
                raise MergelabError(f"tokenizer.tokens['{token}'].source '{source}' is not one of the merged models; "
                                    f"name one of: {', '.join(vocabs)}")
            if token not in vocabs[source]:
                raise MergelabError(f"tokenizer.tokens['{token}'].source: model '{source}' has no token {token!r}; "
                                    f"choose a model whose tokenizer has it")
            (forced if getattr(setting, "force", False) else filled)[token] = source
        if token not in out_vocab:
            owner = source or next((ref for ref in vocabs if token in vocabs[ref]), None)
            output.add([token], tokenizers[owner].specials() if owner else {token})
            out_vocab = output.vocab()

    token_rows = max(out_vocab.values(), default=-1) + 1
    rows = token_rows
    if mode == "base":
        rows = max(rows, row_counts[base_ref])
    multiple = pad_to_multiple_of or _padding_multiple(row_counts[base_ref], vocabs[base_ref])
    if multiple:
        rows = math.ceil(rows / multiple) * multiple

    by_row = {row: token for token, row in out_vocab.items()}
    token_of_row = [by_row.get(row) for row in range(rows)]
    is_token = torch.zeros(rows, dtype=torch.bool)
    is_token[list(out_vocab.values())] = True
    every_row = torch.arange(rows)
    row_maps = {}
    for ref, vocab in vocabs.items():
        ids = torch.tensor(list(vocab.values()), dtype=torch.int64)
        # a token's row in this model (-1 where it lacks the token)
        if vocab.items() <= out_vocab.items():  # its tokens sit at the output's ids (the shared vocabulary)
            mapping = torch.full((rows,), -1, dtype=torch.int64)
            mapping[ids] = ids
        else:
            mapping = torch.tensor([vocab.get(t, -1) if t is not None else -1 for t in token_of_row], dtype=torch.int64)
        # a padding row of the output: the same padding row of this model, where it has one
        padding = every_row < row_counts[ref]
        padding[ids[ids < rows]] = False
        padding &= ~is_token
        mapping[padding] = every_row[padding]
        row_maps[ref] = mapping
    present = torch.stack([m >= 0 for m in row_maps.values()]).any(0).tolist()
    new_tokens = [by_row[row] for row in range(token_rows) if row in by_row and not present[row]]
    forced_rows = {out_vocab[token]: ref for token, ref in forced.items()}
    filled_rows = {out_vocab[token]: ref for token, ref in filled.items()}
    return Vocabulary(output, rows, row_maps, forced_rows, new_tokens, filled_rows)


def _padding_multiple(rows: int, vocab: dict[str, int]) -> int | None:
    """The multiple a model pads its embedding to (the largest power of two up to 256 that
    divides its rows), when it has rows past its last token; None when it does not pad."""
    if rows <= max(vocab.values(), default=-1) + 1:
        return None
    multiple = 256
    while rows % multiple:
        multiple //= 2
    return multiple if multiple > 1 else None


def mismatch_message(models: dict[str, Path], reference: str, other: str, name: str, rows: tuple[int, int]) -> str:
    """Why two models' vocabulary tensors differ, naming the differing tokens, for a merge that
    set no tokenizer_source."""
    try:
        vocab_a = ModelTokenizer(models[reference], f"model '{reference}'").vocab()
        vocab_b = ModelTokenizer(models[other], f"model '{other}'").vocab()
    except MergelabError:
        vocab_a = vocab_b = None
    if vocab_a is None:
        what = "the models use different vocabularies"
    else:
        only_a = sorted(set(vocab_a) - set(vocab_b), key=vocab_a.get)
        only_b = sorted(set(vocab_b) - set(vocab_a), key=vocab_b.get)
        if not only_a and not only_b:
            what = "the tokens are the same; one model pads its embedding"
        else:
            parts = [f"'{ref}' alone has {_few(tokens)}" for ref, tokens in ((reference, only_a), (other, only_b))
                     if tokens]
            what = "; ".join(parts)
    return (f"vocab size mismatch: tensor '{name}' has {rows[0]} rows in model '{reference}' but {rows[1]} in "
            f"model '{other}' ({what}); set tokenizer_source: union (or base, or a tokenizer path) to align the "
            f"embeddings by token")


def _few(tokens: list[str], shown: int = 5) -> str:
    listed = ", ".join(repr(t) for t in tokens[:shown])
    return listed + (f" and {len(tokens) - shown} more" if len(tokens) > shown else "")


def union_if_vocabularies_differ(models) -> dict[str, str]:
    """``{"tokenizer_source": "union"}`` when the models' ``vocab_size`` differ (added tokens, a
    padded embedding), else ``{}``: what LM-Cocktail and the grid add to the configs they build,
    so models that differ only by added tokens merge through the union vocabulary (the first
    model's tokenizer, plus the others' added tokens)."""
    sizes = set()
    for model in models:
        config_path = Path(model) / "config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, json.JSONDecodeError):
            config = {}
        sizes.add(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size"))
    return {"tokenizer_source": "union"} if len(sizes - {None}) > 1 else {}


# -- merging rows ------------------------------------------------------------------------------
def merge_rows(vocab: Vocabulary, method, params: dict[str, Any], extra: dict[str, Any],
               base: tuple[str, torch.Tensor] | None, experts: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """One vocabulary tensor of the output: each row merged from the models that have its token.

    ``base`` and ``experts`` are (model ref, the model's whole tensor); ``params`` the method's
    parameters for this tensor (per-model lists aligned with ``experts``).
    """
    reference = (base or experts[0])[1]
    out = _reusable(vocab, experts + ([base] if base else []))
    if out is None:
        out = torch.empty((vocab.rows, *reference.shape[1:]), dtype=reference.dtype, device=reference.device)
    device = reference.device
    done = torch.zeros(vocab.rows, dtype=torch.bool, device=device)
    maps = [vocab.row_maps[ref].to(device) for ref, _ in experts]
    base_map = vocab.row_maps[base[0]].to(device) if base else None
    have = torch.stack([m >= 0 for m in maps])  # (n_experts, rows)
    base_has = base_map >= 0 if base_map is not None else torch.zeros(vocab.rows, dtype=torch.bool, device=device)
    weights = _weights(method, params, len(experts))
    key = (have.long() * (2 ** torch.arange(len(experts), device=device)).unsqueeze(1)).sum(0)  # (rows,)
    key = key * 2 + base_has.long()
    forced = torch.zeros(vocab.rows, dtype=torch.bool, device=device)
    refs = [ref for ref, _ in experts] + ([base[0]] if base else [])
    tensors = dict(experts + ([base] if base else []))
    maps_by_ref = dict(zip([ref for ref, _ in experts], maps)) | ({base[0]: base_map} if base else {})
    for row, ref in vocab.forced.items():
        if ref in refs:
            out[row] = tensors[ref][maps_by_ref[ref][row]]
            forced[row] = done[row] = True
    for row, ref in vocab.filled.items():  # models without the token take ref's row, then the usual merge
        if ref in refs and not bool(forced[row]):
            lent = tensors[ref][maps_by_ref[ref][row]]

            def row_of(tensor: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
                return (tensor[mapping[row]] if mapping[row] >= 0 else lent).unsqueeze(0).clone()

            picked = [row_of(tensor, mapping) for (_, tensor), mapping in zip(experts, maps)]
            base_row = row_of(base[1], base_map) if base else None
            everyone = list(range(len(experts)))
            out[row] = _merge_group(method, params, extra, everyone, len(experts), weights, picked, base_row, base)[0]
            forced[row] = done[row] = True
    for group in torch.unique(key[~forced]).tolist():
        rows = torch.nonzero((key == group) & ~forced).squeeze(1)
        subset = [i for i in range(len(experts)) if (group >> (i + 1)) & 1]
        with_base = bool(group & 1) and base is not None
        if not subset and not with_base:
            continue  # no model has these tokens: the mean row, below
        picked = [_take(experts[i][1], maps[i][rows]) for i in subset]
        base_rows = _take(base[1], base_map[rows]) if with_base else None
        merged = _merge_group(method, params, extra, subset, len(experts), weights, picked, base_rows, base)
        if _consecutive(rows):
            out.narrow(0, int(rows[0]), len(rows)).copy_(merged)
        else:
            out[rows] = merged
        done[rows] = True
    if not bool(done.all()):
        out[~done] = out[done].mean(0) if bool(done.any()) else 0
    return out


def _reusable(vocab: Vocabulary, inputs: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """An input tensor that can hold the output in place: as many rows as the output and each
    of its rows either at the same output row or unused. Every output row then reads it at
    most at that row, so writing a merged row over it never overwrites a row still to be read
    (the inputs are the engine's own fresh copies, as every method may assume)."""
    for ref, tensor in inputs:
        mapping = vocab.row_maps[ref]
        if tensor.shape[0] == vocab.rows and bool(((mapping == torch.arange(vocab.rows)) | (mapping < 0)).all()):
            return tensor
    return None


def _consecutive(index: torch.Tensor) -> bool:
    return len(index) > 0 and int(index[-1]) - int(index[0]) == len(index) - 1 and bool((index.diff() == 1).all())


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor``'s rows at ``index``: a view where they are consecutive (the shared vocabulary,
    usually), so the common case copies nothing."""
    return tensor.narrow(0, int(index[0]), len(index)) if _consecutive(index) else tensor.index_select(0, index)


def _weights(method, params: dict[str, Any], count: int) -> list[float]:
    weight = params.get("weight")
    return [float(w) for w in weight] if isinstance(weight, list) else [1.0] * count


def _merge_group(method, params, extra, subset, count, weights, picked, base_rows, base):
    """The rows one subset of models has: the method over that subset, or a weighted mean where
    the method cannot run on it."""
    full = subset == list(range(count))
    needs_base = method.uses_base or (method.optional_base and base is not None)
    if full and (base_rows is not None or not needs_base):
        return method(picked, base_rows, **params, **extra)
    if not subset:  # only the base has these tokens
        return base_rows
    fits = len(subset) >= method.min_models and (method.max_models is None or len(subset) <= method.max_models)
    if fits and (base_rows is not None or not needs_base):
        return method(picked, base_rows, **_subset_params(method, params, subset, weights), **extra)
    if len(picked) == 1:
        return picked[0]
    chosen = torch.tensor([weights[i] for i in subset], dtype=picked[0].dtype, device=picked[0].device)
    if float(chosen.sum()) == 0:
        chosen = torch.ones_like(chosen)
    stacked = torch.stack(picked)  # (n_subset, rows, ...)
    return (stacked * (chosen / chosen.sum()).view(-1, *[1] * (stacked.dim() - 1))).sum(0)


def _subset_params(method, params: dict[str, Any], subset: list[int], weights: list[float]) -> dict[str, Any]:
    per_model = {p.name for p in method.params if p.per_model}
    chosen = {name: ([value[i] for i in subset] if name in per_model and isinstance(value, list) else value)
              for name, value in params.items()}
    if isinstance(chosen.get("weight"), list):
        total, part = sum(weights), sum(weights[i] for i in subset)
        if part != 0:
            chosen["weight"] = [w * total / part for w in chosen["weight"]]
    return chosen


# -- writing the output tokenizer ---------------------------------------------------------------
def save_tokenizer(vocab: Vocabulary, target: Path) -> None:
    """Write the output tokenizer into ``target`` (replacing any copied tokenizer files)."""
    for item in target.iterdir():
        if item.is_file() and (item.name.startswith(TOKENIZER_FILES) or item.name == "tokenizer_config.json"):
            item.unlink()
    vocab.tokenizer.save(target)


def read_chat_template(directory: Path) -> str | None:
    """A model directory's chat template (``chat_template.jinja`` or tokenizer_config.json's)."""
    jinja = Path(directory) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = Path(directory) / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def resolve_chat_template(value: str, inputs: dict[str, Path]) -> str:
    """The template text for a config's ``chat_template``: a built-in name, ``auto`` (the
    template most inputs carry; ties go to the first model's), or a Jinja string."""
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if value == "auto":
        found = [t for t in (read_chat_template(path) for path in inputs.values()) if t]
        if not found:
            raise MergelabError(f"chat_template: auto found no chat template in any input model; name one of "
                                f"{', '.join(BUILTIN_TEMPLATES)} or give a Jinja template")
        counts = Counter(found)
        return max(dict.fromkeys(found), key=lambda t: counts[t])
    if "{{" not in value and "{%" not in value:
        raise MergelabError(f"chat_template '{value}' is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
                            f"'auto', nor a Jinja template")
    try:
        import jinja2

        jinja2.Environment().parse(value)
    except Exception as exc:  # jinja2.TemplateSyntaxError, or jinja2 missing
        raise MergelabError(f"chat_template is not a valid Jinja template: {str(exc).splitlines()[0]}") from None
    return value


def write_chat_template(target: Path, template: str) -> None:
    """Put ``template`` into ``target``'s tokenizer_config.json (and chat_template.jinja, which
    transformers 5 reads first)."""
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (target / "chat_template.jinja").write_text(template)
