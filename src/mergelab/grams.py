"""Input Gram matrices of every linear layer, for RegMean (``mergelab regmean-stats``).

For each ``nn.Linear`` with weight W [out, in], a forward pre-hook accumulates G = Xᵀ X [in, in]
in float64 over the non-padding tokens of the examples, where X holds the layer's inputs one
token per row. The file (safetensors, float32) is keyed by the weight's name in the checkpoint,
so ``merge_method: regmean`` can point at it per model (``parameters: {gram: FILE}``); its
metadata records the number of examples and tokens. A linear layer that shares its weight with
the input embeddings (a tied lm_head) has no Gram: that tensor is averaged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergelab.errors import MergelabError
from mergelab.threads import Threads, check_threads, module_params, use_threads


def gram_matrices(model: torch.nn.Module, batches, names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Xᵀ X (float64) of the inputs of every ``nn.Linear`` over the batches' non-padding tokens.

    Args:
        model: a transformers model (any module whose forward takes ``input_ids`` and
            ``attention_mask``).
        batches: dicts with ``input_ids`` and ``attention_mask`` (B, L) and any other inputs.
        names: module name -> the name its Gram is stored under (default ``<module>.weight``);
            modules left out are not hooked.

    Returns:
        {stored name: (in, in) float64 tensor}.
    """
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    names = names if names is not None else {name: f"{name}.weight" for name in linears}
    sums = {names[n]: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=m.weight.device)
            for n, m in linears.items() if n in names}
    current: dict[str, torch.Tensor] = {}

    def hook_for(key: str):
        def hook(module, args):
            inputs, mask = args[0], current["mask"]
            rows = inputs.reshape(-1, inputs.shape[-1])  # (tokens, in)
            if rows.shape[0] == mask.numel():  # one row per token: keep the non-padding ones
                rows = rows[mask.reshape(-1)]
            rows = rows.detach().to(torch.float64)
            sums[key].addmm_(rows.T, rows)
        return hook

    handles = [linears[n].register_forward_pre_hook(hook_for(names[n])) for n in linears if n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums


def regmean_stats(model_dir: str | Path, data: str | Path, out: str | Path, *, examples: int = 256,
                  max_length: int = 512, batch_size: int = 8, device: str = "cpu", force: bool = False,
                  tokenizer: str | Path | None = None, threads: Threads = "auto", quiet: bool = False) -> Path:
    """Compute a model's RegMean statistics on a task file and save them.

    A decoder (a ``...ForCausalLM`` checkpoint) sees each record as it was fine-tuned on it:
    ``<s> input output </s>`` (the scorer's tokenization, ``mergelab.lm.encode``); an encoder
    sees ``input`` (and ``output`` after it, when given). Every check a user can fail runs before
    the first forward pass; the file appears only when complete.

    Args:
        model_dir: a Hugging Face model directory.
        data: the evaluation harness's task records (``mergelab.data_aware.task_records``).
        out: the ``.safetensors`` file to write.
        examples: use the first this many records.

    Returns:
        ``out``.

    Example:
        >>> regmean_stats("experts/add", "data/add/train.jsonl", "add.gram.safetensors")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from mergelab.data_aware import task_records
    from mergelab.devices import check_device
    from mergelab.io import CheckpointReader
    from mergelab.loading import check_model_dir, load_model
    from mergelab.outdir import check_output_file

    out = check_output_file(out, force, what="statistics file")
    for value, name, low in ((examples, "--examples", 1), (max_length, "--max-length", 2),
                             (batch_size, "--batch-size", 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MergelabError(f"{name} must be a whole number of at least {low}, got {value!r}")
    device = check_device(device, "--device")
    threads = check_threads(threads, "--threads")
    check_model_dir(model_dir, tokenizer)
    records = task_records(data, examples)
    kind = model_kind(model_dir)
    model, loaded_tokenizer = load_model(model_dir, kind, tokenizer=tokenizer, device=device)
    with CheckpointReader(Path(model_dir), label=str(model_dir)) as reader:
        stored = set(reader.tensors)
    names = _stored_names(model, stored)
    if not names:
        raise MergelabError(f"model {model_dir} has no linear layer whose weight is stored in its checkpoint; "
                            f"RegMean has nothing to compute")
    batches = list(_batches(records, loaded_tokenizer, kind, max_length, batch_size, device))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    with use_threads(threads, work_params=module_params(model)):
        grams = gram_matrices(model, tqdm(batches, desc="regmean-stats", unit="batch", disable=quiet), names)
    metadata = {"format": "pt", "statistic": "regmean input Gram X^T X", "examples": str(len(records)),
                "tokens": str(tokens), "model": str(model_dir), "data": str(data)}
    _publish({name: gram.float().cpu() for name, gram in grams.items()}, out, metadata)
    return out


def model_kind(model_dir: str | Path) -> str:
    """"causal" for a checkpoint whose config names a ``...ForCausalLM`` / ``...LMHeadModel``, else "encoder"."""
    import json

    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return "causal"  # a BASE+ADAPTER reference: check_model_dir/load_model say what is wrong
    architectures = config.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return "causal" if causal or not architectures else "encoder"


def _stored_names(model: torch.nn.Module, stored: set[str]) -> dict[str, str]:
    """Module name -> checkpoint tensor name of each linear weight the checkpoint stores (a model
    loaded with ``AutoModel`` from a task checkpoint lacks the ``bert.``-like prefix)."""
    embeddings = model.get_input_embeddings()
    tied = embeddings.weight if embeddings is not None else None
    prefix = getattr(model, "base_model_prefix", "")
    names = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module.weight is tied:
            continue
        for candidate in (f"{name}.weight", f"{prefix}.{name}.weight"):
            if candidate in stored:
                names[name] = candidate
                break
    return names


def _batches(records, tokenizer, kind: str, max_length: int, batch_size: int, device):
    from mergelab.evaluate.decoder import ensure_pad_token, pad, split_encode

    pad_id = ensure_pad_token(tokenizer)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        if kind == "encoder":
            texts = [r["input"] + (" " + r["output"] if "output" in r else "") for r in chunk]
            encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            yield {k: v.to(device) for k, v in encoded.items()}
            continue
        rows = []
        for record in chunk:
            if "output" in record:
                prompt, answer = split_encode(tokenizer, record["input"], record["output"])
                ids = prompt + answer + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
            else:
                ids = tokenizer(record["input"])["input_ids"]
            rows.append(ids[:max_length])
        input_ids, attention_mask = pad(rows, pad_id)
        yield {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _publish(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write a hidden sibling, then rename it into place (``out`` was checked before the work)."""
    from safetensors.torch import save_file

    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, partial, metadata=metadata)
        os.replace(partial, out)
    except OSError as exc:
        raise MergelabError(f"cannot write {out}: {exc.strerror or exc}; nothing was written") from None
    finally:
        partial.unlink(missing_ok=True)
