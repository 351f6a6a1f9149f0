"""LoRA / PEFT adapters: as merge inputs (``BASE+ADAPTER``), merged into one adapter,
extracted from a fine-tune, and in LM-Cocktail and SFA."""

from mergelab.adapters.peft_dir import LoraAdapter, LoraModule, is_adapter_dir, require_peft
from mergelab.adapters.reader import AdapterReader, adapter_input, open_reader

__all__ = ["AdapterReader", "LoraAdapter", "LoraModule", "adapter_input", "is_adapter_dir", "open_reader",
           "require_peft"]
