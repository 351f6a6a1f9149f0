"""Models with adapters wherever a model directory is loaded (LM-Cocktail candidates, evaluation).

``check_model_dir`` and ``load_model`` take what ``mergelab.loading``'s do, plus a PEFT adapter
directory (its ``adapter_config.json`` names the base) or ``BASE+ADAPTER``: the base is checked
and loaded as usual and the adapter merged into it with PEFT (``merge_and_unload``), so the
model scores exactly as the merged checkpoint would. Anything else is passed through unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergelab import loading
from mergelab.adapters.reader import AdapterReader, adapter_input
from mergelab.errors import MergelabError


def adapter_parts(path: str | Path) -> tuple[Path, Path] | None:
    """(base, adapter) when ``path`` is an adapter directory or ``BASE+ADAPTER``, else None."""
    text = str(path)
    if Path(text).exists():  # an ordinary model directory or file needs no Hub lookup
        return adapter_input(text) if (Path(text) / "adapter_config.json").is_file() else None
    return adapter_input(text) if "+" in text else None


def check_model_dir(path: str | Path, tokenizer: str | Path | None = None, *, what: str = "model") -> Path:
    """``mergelab.loading.check_model_dir`` that also takes adapters; returns the tokenizer directory
    (the adapter's own tokenizer when it has one, else the base's)."""
    parts = adapter_parts(path)
    if parts is None:
        return loading.check_model_dir(path, tokenizer, what=what)
    base, adapter = parts
    if tokenizer is None and loading._has_tokenizer(adapter):
        tokenizer = adapter
    source = loading.check_model_dir(base, tokenizer, what=f"base of {what} {path}")
    with AdapterReader(base, adapter, label=str(path)):  # the adapter's shapes against the base's headers
        pass
    return source


def load_model(path: str | Path, kind: str = "causal", *, tokenizer: str | Path | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, what: str = "model",
               progress: bool = False):
    """``mergelab.loading.load_model`` that also takes adapters: (base with the adapter merged in, tokenizer)."""
    parts = adapter_parts(path)
    if parts is None:
        return loading.load_model(path, kind, tokenizer=tokenizer, device=device, dtype=dtype, what=what,
                                  progress=progress)
    from mergelab.adapters.peft_dir import require_peft

    peft = require_peft()
    base, adapter = parts
    tokenizer = check_model_dir(path, tokenizer, what=what)
    model, loaded_tokenizer = loading.load_model(base, kind, tokenizer=tokenizer, dtype=dtype, what=what,
                                                 progress=progress)
    try:
        with loading.quiet_transformers(progress):
            model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergelabError(f"cannot apply adapter {adapter} to {what} base {base}: "
                            f"{loading.first_line(exc)}") from None
    return model.to(device).eval(), loaded_tokenizer
