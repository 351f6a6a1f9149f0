"""The options of LM-Cocktail's few-shot loss, importable without torch (the CLI builds its
options from these fields at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mergelab.errors import MergelabError


@dataclass(frozen=True)
class LossOptions:
    """How L(M_i, E_t) of Eq. 2 is computed; one value passed whole to every recipe.

    Each field's ``help`` metadata is also the text of its command-line option.
    """

    max_length: int | None = field(default=None, metadata={
        "help": "Tokens per sequence (default: 2048 for decoders, 512 for encoders)."})
    pooling: str | None = field(default=None, metadata={
        "help": "Encoder pooling, cls or mean (default: the directory's sentence-transformers pooling, else cls).",
        "choices": ("cls", "mean")})
    neg_number: int = field(default=7, metadata={"help": "Encoder negatives per query."})
    query_instruction: str = field(default="", metadata={"help": "Encoder: text put before every query."})
    contrastive_temperature: float = field(default=0.05, metadata={
        "help": "Encoder: temperature of the in-batch contrastive loss."})

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 1:
            raise MergelabError(f"max_length must be at least 1, got {self.max_length}")
        if self.pooling not in (None, "cls", "mean"):
            raise MergelabError(f"pooling '{self.pooling}' is not known; use cls or mean")
        if self.neg_number < 0:
            raise MergelabError(f"neg_number must be >= 0, got {self.neg_number}")
        if self.contrastive_temperature <= 0:
            raise MergelabError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
