"""The model card (``README.md``) written into every merged model directory.

It follows the Hugging Face model card form: YAML front matter the Hub reads
(``base_model``, ``library_name``, ``tags``), then what was merged, by which method and
paper, the exact config, and the mergelab version, so that the merge can be repeated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml


def model_card(method: str, paper: str, summary: str, inputs: Sequence[str], base: str | None,
               config_yaml: str) -> str:
    """The text of the card.

    Args:
        method: the registered merge method's name.
        paper: its paper (one line), from the registry.
        summary: its formula in words, from the registry.
        inputs: every input model, as the config wrote it (the base first when there is one).
        base: the base model, as written, or None.
        config_yaml: the exact config that was run.

    Example:
        >>> print(model_card("linear", "Model soups", "average", ["a", "b"], None, "x: 1")[:3])
        ---
    """
    from mergelab import __version__

    front = {"base_model": list(dict.fromkeys(inputs)), "library_name": "transformers",
             "tags": ["merge", "mergelab", method]}
    listed = "\n".join(f"- `{ref}`" + (" (base model)" if ref == base else "") for ref in dict.fromkeys(inputs))
    return (
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---\n\n"
        f"# Merged model\n\n"
        f"This model was made with [mergelab](https://pypi.org/project/mergelab/) {__version__} by merging "
        f"the models below with **{method}** ({summary}; {paper}).\n\n"
        f"## Models merged\n\n{listed}\n\n"
        f"## Configuration\n\nThe exact configuration, to repeat the merge with `mergelab merge config.yml OUT`:\n\n"
        f"```yaml\n{config_yaml.rstrip()}\n```\n"
    )


def write_model_card(directory: Path, **fields) -> Path:
    """Write ``directory/README.md`` from :func:`model_card`'s fields; returns its path."""
    path = Path(directory) / "README.md"
    path.write_text(model_card(**fields))
    return path


def append_card_section(directory: Path, title: str, text: str) -> Path:
    """Add a ``## title`` section to ``directory/README.md`` (what a data-aware method learned or
    used, say); returns its path."""
    path = Path(directory) / "README.md"
    with path.open("a") as card:
        card.write(f"\n## {title}\n\n{text.rstrip()}\n")
    return path
