"""Layer surgery: where an architecture keeps its blocks, and which input layer each output layer is.

A ``slices`` config builds a model from ranges of layers of one or more models (mergekit's
format): each slice's sources take the same number of layers; a slice with one source is
copied, one with several is merged with the config's method, layer by layer. The output's
blocks are renumbered 0..L'−1, ``num_hidden_layers`` is rewritten and the config's per-layer
lists (``layer_types``, say) are cut to match.

Layer tensor names are recognised per architecture family (``LAYOUTS``); tensors outside the
blocks are the embeddings (before the blocks) and the final norm and lm_head (after them).

Example:
    >>> layout = find_layout(["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"])
    >>> layout.prefix, layout.split("model.layers.0.mlp.up_proj.weight")
    ('model.layers.', (0, 'mlp.up_proj.weight'))
    >>> layout.name(5, "mlp.up_proj.weight")
    'model.layers.5.mlp.up_proj.weight'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from mergelab.errors import MergelabError

# The families whose block names are known: (family, prefix before the block index).
LAYOUTS = (
    ("Llama/Mistral/Qwen/Gemma/Phi", "model.layers."),
    ("GPT-2/GPT-J/Falcon", "transformer.h."),
    ("GPT-NeoX", "gpt_neox.layers."),
    ("OPT", "model.decoder.layers."),
    ("MPT", "transformer.blocks."),
    ("Phi-1/1.5 (old layout)", "transformer.layers."),
    ("multimodal language models", "model.language_model.layers."),
    ("BERT/RoBERTa", "encoder.layer."),
)

# Tensors outside the blocks that come before them (the input side); the rest come after.
_INPUT_SIDE = re.compile(r"(embed|wte\.|wpe\.|word_embeddings|position_embeddings|token_type_embeddings"
                         r"|embeddings\.)")


@dataclass(frozen=True)
class Layout:
    """Where one checkpoint keeps its blocks: ``{prefix}{index}.{rest}``, the prefix as the
    checkpoint spells it (``bert.encoder.layer.`` for a BERT saved with its head)."""

    family: str
    prefix: str

    def split(self, tensor_name: str) -> tuple[int, str] | None:
        """(block index, the name inside the block), or None for a tensor outside the blocks."""
        if not tensor_name.startswith(self.prefix):
            return None
        index, dot, rest = tensor_name[len(self.prefix):].partition(".")
        return (int(index), rest) if dot and index.isdigit() else None

    def name(self, index: int, rest: str) -> str:
        """The tensor name of block ``index`` for a name inside the block."""
        return f"{self.prefix}{index}.{rest}"


def find_layout(tensor_names: Iterable[str], label: str = "model") -> Layout:
    """The known block layout of a checkpoint, or a one-line error naming the known ones."""
    counts: dict[tuple[str, str], int] = {}
    for name in tensor_names:
        for family, prefix in LAYOUTS:
            match = re.match(rf"((?:\w+\.)*?){re.escape(prefix)}\d+\.", name)
            if match:
                key = (family, match.group(1) + prefix)
                counts[key] = counts.get(key, 0) + 1
                break
    if not counts:
        known = ", ".join(f"{prefix}N. ({family})" for family, prefix in LAYOUTS)
        raise MergelabError(f"{label}: no tensor name follows a known layer layout, so its layers cannot be sliced; "
                            f"known layouts: {known}")
    family, prefix = max(counts, key=counts.get)
    return Layout(family, prefix)


def is_input_side(tensor_name: str) -> bool:
    """Whether a tensor outside the blocks sits before them (embeddings) rather than after
    (final norm, lm_head, pooler)."""
    return bool(_INPUT_SIDE.search(tensor_name))


@dataclass(frozen=True)
class OutputLayer:
    """One block of the output: where it comes from, and where its slice's gradient is evaluated."""

    slice_index: int
    position: float  # 0 at the slice's first layer, 1 at its last (a one-layer slice: 1), as mergekit
    sources: tuple[tuple[str, int], ...]  # (model ref, input block index), in the slice's order


def plan_layers(slices: list, layer_counts: dict[str, int]) -> list[OutputLayer]:
    """The output blocks, in order, from ``slices`` (``config.Slice``), checked against each
    model's number of blocks (``layer_counts``: model ref -> count).

    Example:
        >>> from mergelab.config import Slice
        >>> two = [Slice(sources=[{"model": "m", "layer_range": r}]) for r in ([0, 2], [1, 3])]
        >>> [layer.sources for layer in plan_layers(two, {"m": 3})]
        [(('m', 0),), (('m', 1),), (('m', 1),), (('m', 2),)]
    """
    layers = []
    for number, piece in enumerate(slices):
        for index, source in enumerate(piece.sources):
            start, end = source.layer_range
            count = layer_counts[source.model]
            if end > count:
                raise MergelabError(f"slices[{number}].sources[{index}]: layer_range [{start}, {end}) of model "
                                    f"'{source.model}' goes past its {count} layers; the last range it has is "
                                    f"[{max(0, count - (end - start))}, {count})")
        length = piece.sources[0].layer_range[1] - piece.sources[0].layer_range[0]
        for offset in range(length):
            position = offset / (length - 1) if length > 1 else 1.0
            picks = tuple((source.model, source.layer_range[0] + offset) for source in piece.sources)
            layers.append(OutputLayer(number, position, picks))
    return layers


def cut_config(config: dict, layers: list[OutputLayer], configs: dict[str, dict], old_count: int) -> dict:
    """``config`` (the reference model's config.json) for the output blocks: the new
    ``num_hidden_layers``, and every per-layer list (a list as long as the old layer count,
    e.g. ``layer_types``) taken from the first source's own config at its picked layer.
    Nested ``text_config`` is handled the same way."""
    result = dict(config)
    nested = "text_config" if isinstance(config.get("text_config"), dict) and "num_hidden_layers" not in config \
        else None
    target = dict(result[nested]) if nested else result
    count_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in target), "num_hidden_layers")
    target[count_key] = len(layers)
    for key, value in list(target.items()):
        if isinstance(value, list) and len(value) == old_count and old_count > 1:
            picked = []
            for layer in layers:
                model, index = layer.sources[0]
                own = configs.get(model) or {}
                own = own.get(nested, own) if nested else own
                own_list = own.get(key) if isinstance(own.get(key), list) else value
                picked.append(own_list[index] if index < len(own_list) else value[index])
            target[key] = picked
    if nested:
        result[nested] = target
    return result


@dataclass(frozen=True)
class SliceTensor:
    """One output tensor of a ``slices`` merge and the input tensors it is made from."""

    name: str  # in the output, blocks renumbered
    slice_index: int  # whose sources (and parameters) make it
    position: float  # where that slice's gradients are evaluated
    inputs: tuple[tuple[str, str], ...]  # (model ref, input tensor name), one per source of the slice


def slice_tensors(slices: list, shapes: dict[str, dict[str, tuple]], rows_may_differ=lambda name: False
                  ) -> tuple[list[SliceTensor], list[OutputLayer], int]:
    """Every output tensor of a ``slices`` merge, in order: the tensors before the blocks (from
    the first slice's sources), the blocks, the tensors after them (from the last slice's).

    Args:
        slices: the config's slices.
        shapes: model ref -> {tensor name: (shape, is_floating_point)} for every model used.
        rows_may_differ: names (embeddings, lm_head) whose row counts may differ between models
            because the vocabularies are aligned by token.

    Returns:
        (the tensors, the output blocks, the reference model's block count). Every range, layout
        and shape is checked first; an error names the model, the tensor and the fix.
    """
    reference = slices[0].sources[0].model
    layouts = {ref: find_layout(names, f"model '{ref}'") for ref, names in shapes.items()}
    for ref, layout in layouts.items():
        if layout.prefix != layouts[reference].prefix:
            raise MergelabError(f"model '{ref}' keeps its layers under '{layout.prefix}N.' but model '{reference}' "
                                f"under '{layouts[reference].prefix}N.'; slices stack models of one architecture")
    blocks = {ref: _blocks(layouts[ref], names) for ref, names in shapes.items()}
    layers = plan_layers(slices, {ref: len(found) for ref, found in blocks.items()})
    template = blocks[reference][0]
    for ref, found in blocks.items():
        for index, block in enumerate(found):
            _same_tensors(block, template, f"layer {index} of model '{ref}'", f"layer 0 of model '{reference}'",
                          rows_may_differ)
    outside = {name: info for name, info in shapes[reference].items() if layouts[reference].split(name) is None}
    planned = []
    for name in [n for n in outside if is_input_side(n)]:
        planned.append(_outside(name, 0, slices, shapes, outside, reference, rows_may_differ))
    for out_index, layer in enumerate(layers):
        for rest in template:
            inputs = tuple((ref, layouts[ref].name(index, rest)) for ref, index in layer.sources)
            planned.append(SliceTensor(layouts[reference].name(out_index, rest), layer.slice_index, layer.position,
                                       inputs))
    for name in [n for n in outside if not is_input_side(n)]:
        planned.append(_outside(name, len(slices) - 1, slices, shapes, outside, reference, rows_may_differ))
    return planned, layers, len(blocks[reference])


def _blocks(layout: Layout, shapes: dict[str, tuple]) -> list[dict[str, tuple]]:
    found: dict[int, dict[str, tuple]] = {}
    for name, info in shapes.items():
        split = layout.split(name)
        if split is not None:
            found.setdefault(split[0], {})[split[1]] = info
    count = max(found) + 1
    missing = [i for i in range(count) if i not in found]
    if missing:
        raise MergelabError(f"layers {missing[:5]} under '{layout.prefix}N.' have no tensors; the checkpoint is "
                            f"incomplete")
    return [found[i] for i in range(count)]


def _same_tensors(found: dict, expected: dict, what: str, against: str, rows_may_differ) -> None:
    for rest in sorted(set(found) | set(expected)):
        if rest not in found or rest not in expected:
            where, other = (what, against) if rest not in found else (against, what)
            raise MergelabError(f"tensor '{rest}' is in {other} but not in {where}; slices stack models of one "
                                f"architecture")
        (shape, is_float), (shape_b, is_float_b) = found[rest], expected[rest]
        same = shape == shape_b or (rows_may_differ(rest) and tuple(shape[1:]) == tuple(shape_b[1:]))
        if not same or is_float != is_float_b:
            raise MergelabError(f"tensor '{rest}' has shape {tuple(shape)} in {what} but {tuple(shape_b)} in "
                                f"{against}; slices stack models of one architecture")


def _outside(name, slice_index, slices, shapes, outside, reference, rows_may_differ) -> SliceTensor:
    sources = slices[slice_index].sources
    for source in sources:
        if name not in shapes[source.model]:
            raise MergelabError(f"tensor '{name}' of model '{reference}' is missing from model '{source.model}' "
                                f"(slices[{slice_index}]); slices stack models of one architecture")
        _same_tensors({name: shapes[source.model][name]}, {name: outside[name]}, f"model '{source.model}'",
                      f"model '{reference}'", rows_may_differ)
    return SliceTensor(name, slice_index, 0.0, tuple((source.model, name) for source in sources))
