"""Load a Hugging Face model directory as a transformers model, with one set of clear errors.

Evaluation, LM-Cocktail, continual training and Fisher estimation all load models through
``load_model``. ``check_model_dir`` makes the cheap checks (the path exists, holds a config,
weights whose files are well formed, and a usable tokenizer) without building the model, so a
command can run it on every input before its first expensive step.
"""

from __future__ import annotations

import math
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError

from mergelab.errors import MergelabError
from mergelab.io import BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE, CheckpointReader, unsafe_checkpoint_message

KINDS = ("causal", "encoder")
WEIGHT_FILES = (SAFE_INDEX, SAFE_SINGLE, BIN_INDEX, BIN_SINGLE)
# Any one of these lets AutoTokenizer build a tokenizer without downloading anything:
# a fast tokenizer's JSON, a sentencepiece/tiktoken model, a WordPiece vocabulary, or a BPE pair.
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("spiece.model",), ("sentencepiece.bpe.model",),
                   ("vocab.txt",), ("vocab.json", "merges.txt"))
TOKENIZER_HINT = "pass --tokenizer PATH (tokenizer= in the Python API) to use another directory's tokenizer"


def _has_tokenizer(directory: Path) -> bool:
    # A tokenizer_config.json alone may still name a tokenizer AutoTokenizer can build; let it try.
    return (directory / "tokenizer_config.json").is_file() or any(
        all((directory / name).is_file() for name in group) for group in TOKENIZER_FILES)


def _tokenizer_files_text() -> str:
    return ", ".join(" + ".join(group) for group in TOKENIZER_FILES)


def check_model_dir(path: str | Path, tokenizer: str | Path | None = None, *, what: str = "model") -> Path:
    """Check that ``path`` is a model directory with a usable tokenizer, without building the model.

    The weights files' layout is validated (safetensors headers; a ``.bin`` is memory-mapped
    with ``weights_only``), so a corrupt or unsafe checkpoint is refused here too.

    Args:
        path: a Hugging Face model directory (config.json plus safetensors or .bin weights).
        tokenizer: a directory holding the tokenizer to use instead of the model's own.
        what: how error messages name the directory ("model", "candidate", ...).

    Returns:
        The directory the tokenizer will be loaded from.

    Example:
        >>> check_model_dir("experts/math")  # doctest: +SKIP
        PosixPath('experts/math')
    """
    from mergelab.adapters.loading import adapter_parts, check_model_dir as check_adapter

    if adapter_parts(path) is not None:  # a PEFT adapter directory or BASE+ADAPTER: checked against its base
        return check_adapter(path, tokenizer, what=what)
    path = Path(path)
    if not path.exists():
        raise MergelabError(f"{what} directory {path} does not exist; check the path")
    if not path.is_dir():
        raise MergelabError(f"{what} {path} is a file, not a model directory; give the directory that holds "
                            f"config.json and the weights")
    if not (path / "config.json").is_file():
        raise MergelabError(f"{what} directory {path} holds no model: config.json is missing")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise MergelabError(f"{what} directory {path} holds no model weights (expected one of "
                            f"{', '.join(WEIGHT_FILES)})")
    with CheckpointReader(path, label=path.name):  # validates every weights file's layout, reads no tensor
        pass
    if tokenizer is None:
        if not _has_tokenizer(path):
            raise MergelabError(f"{what} directory {path} has no tokenizer (none of {_tokenizer_files_text()})\n"
                                f"  hint: {TOKENIZER_HINT}")
        return path
    tokenizer = Path(tokenizer)
    if not tokenizer.is_dir():
        raise MergelabError(f"tokenizer directory {tokenizer} does not exist; check the --tokenizer path")
    if not _has_tokenizer(tokenizer):
        raise MergelabError(f"tokenizer directory {tokenizer} has no tokenizer (none of {_tokenizer_files_text()})")
    return tokenizer


def check_vocab(model, tokenizer, where: str) -> None:
    """A tokenizer that emits ids the model has no embedding for is the wrong tokenizer."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise MergelabError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} "
                            f"embeddings; the tokenizer does not belong to this model")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line, for quoting inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bin_files(path: Path) -> str:
    if (path / BIN_SINGLE).is_file():
        return str(path / BIN_SINGLE)
    return f"a .bin shard listed in {path / BIN_INDEX}"


def _check_loading_info(info: dict, path: Path, what: str) -> None:
    """transformers fills tensors the checkpoint lacks with random values and only logs it:
    scoring such a model would silently score noise, so refuse it."""
    missing, mismatched = sorted(info.get("missing_keys") or []), list(info.get("mismatched_keys") or [])
    if missing:
        raise MergelabError(f"{what} {path}: the weights lack {len(missing)} of the model's tensors (e.g. "
                            f"'{missing[0]}'); the checkpoint is incomplete or for another architecture")
    if mismatched:
        name, *shapes = mismatched[0]
        found = f" (checkpoint {tuple(shapes[0])}, config {tuple(shapes[1])})" if len(shapes) == 2 else ""
        raise MergelabError(f"{what} {path}: tensor '{name}' does not have the shape config.json implies{found}; "
                            f"the checkpoint does not match its config")


def load_tokenizer(path: str | Path, tokenizer: str | Path | None = None, *, what: str = "model"):
    """The tokenizer for model directory ``path`` (its own, or the one in ``tokenizer``)."""
    from transformers import AutoTokenizer

    source = check_model_dir(path, tokenizer, what=what)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise MergelabError(f"cannot load the tokenizer in {source}: {first_line(exc)}\n"
                            f"  hint: {TOKENIZER_HINT}") from None


@contextmanager
def quiet_transformers(progress: bool = False) -> Iterator[None]:
    """Run a block with transformers' progress bars ("Loading weights") off unless ``progress``;
    the caller's setting is restored after. A library call should print nothing a caller did
    not ask for."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not progress:
            hf_logging.enable_progress_bar()


def model_params(path: str | Path) -> int | None:
    """The number of parameters in a model directory's weights, from the file headers alone
    (tied tensors stored once count once), or None where ``path`` is no model directory this
    reader knows (an adapter, say). For the thread policy (``mergelab.threads``)."""
    try:
        with CheckpointReader(Path(path), label=Path(path).name) as reader:
            return sum(math.prod(info.shape) for info in reader.tensors.values())
    except (MergelabError, OSError):
        return None


def load_model(path: str | Path, kind: str = "causal", *, tokenizer: str | Path | None = None,
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, what: str = "model",
               progress: bool = False):
    """(model, tokenizer) for a model directory, the model in eval mode on ``device``.

    Args:
        path: a Hugging Face model directory.
        kind: "causal" (``AutoModelForCausalLM``) or "encoder" (``AutoModel``, e.g. for retrieval).
        tokenizer: a directory whose tokenizer to use instead of the model's own.
        device: where to put the model.
        dtype: the dtype to load the weights in (float32 by default).
        what: how error messages name the directory ("model", "candidate", ...).
        progress: show transformers' "Loading weights" progress bar (off by default).

    Raises:
        MergelabError: a missing path, a directory without a model or tokenizer, a ``.bin``
            checkpoint that is not plain tensors, a tokenizer larger than the model's vocabulary,
            or any other load failure, each as one line naming the directory.

    Example:
        >>> model, tokenizer = load_model("experts/math")  # doctest: +SKIP
    """
    from mergelab.adapters.loading import adapter_parts, load_model as load_adapter

    if adapter_parts(path) is not None:  # the base with the adapter merged in
        return load_adapter(path, kind, tokenizer=tokenizer, device=device, dtype=dtype, what=what, progress=progress)
    from transformers import AutoModel, AutoModelForCausalLM

    if kind not in KINDS:
        raise MergelabError(f"model kind '{kind}' is not known; use one of {', '.join(KINDS)}")
    path = Path(path)
    loaded_tokenizer = load_tokenizer(path, tokenizer, what=what)
    loader = AutoModelForCausalLM if kind == "causal" else AutoModel
    try:
        # mismatched shapes are reported in ``info`` (and refused below) rather than raised as a RuntimeError
        with quiet_transformers(progress):
            model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                 ignore_mismatched_sizes=True)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a pickled object
        raise MergelabError(unsafe_checkpoint_message(_bin_files(path))) from None
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise MergelabError(f"cannot load {what} {path} as a {'causal LM' if kind == 'causal' else 'encoder'}: "
                            f"{first_line(exc)}") from None
    _check_loading_info(info, path, what)
    model = model.to(device).eval()
    check_vocab(model, loaded_tokenizer, str(path))
    return model, loaded_tokenizer
