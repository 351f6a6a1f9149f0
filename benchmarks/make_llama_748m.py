"""Generate a Llama-shape 748M-parameter bf16 base model and 4 "experts" for the merge benchmarks.

Each model is a Hugging Face directory: config.json (LlamaForCausalLM) plus 2 safetensors shards
and model.safetensors.index.json. The base is N(0, 0.02) (norms: 1); expert i is the base plus
N(0, noise) per tensor. Tensors are generated and written one shard at a time, so memory stays
near one shard (~0.75 GB). Models already present are skipped.

    python benchmarks/make_llama_748m.py [OUT_DIR] [--experts 4] [--noise 0.002]
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig

HERE = Path(__file__).resolve().parent
SHARDS = 2


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
        tie_word_embeddings=False, dtype="bfloat16", architectures=["LlamaForCausalLM"],
    )


def tensor_shapes(cfg: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes in the order transformers saves a LlamaForCausalLM."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def split_shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Cut the ordered tensor list into SHARDS pieces of about equal bytes."""
    total = sum(torch.Size(s).numel() for _, s in shapes)
    shards: list[list] = [[] for _ in range(SHARDS)]
    used = 0
    for name, shape in shapes:
        shards[min(SHARDS - 1, used * SHARDS // total)].append((name, shape))
        used += torch.Size(shape).numel()
    return shards


def seeded(seed_text: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(seed_text.encode()))


def make_tensor(name: str, shape: tuple[int, ...], base: torch.Tensor | None, tag: str, noise: float) -> torch.Tensor:
    gen = seeded(f"{tag}:{name}")
    if base is not None:  # expert: base + noise
        return (base.float() + torch.randn(shape, generator=gen) * noise).to(torch.bfloat16)
    if len(shape) == 1:  # norm weight
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_model(out: Path, cfg: LlamaConfig, tag: str, base_dir: Path | None, noise: float) -> None:
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    shards = split_shards(tensor_shapes(cfg))
    weight_map, total = {}, 0
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        base_file = safe_open(base_dir / file, "pt") if base_dir else None
        tensors = {}
        for name, shape in shard:
            base = base_file.get_tensor(name) if base_file else None
            tensors[name] = make_tensor(name, shape, base, tag, noise)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        del tensors, base_file
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.save_pretrained(tmp)
    tmp.rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", type=Path, default=HERE / "data")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.002, help="std of each expert's noise")
    args = parser.parse_args()
    cfg = llama_config()
    params = sum(torch.Size(s).numel() for _, s in tensor_shapes(cfg))
    print(f"Llama shape: {params / 1e6:.1f}M parameters, {params * 2 / 1e9:.2f} GB per model in bf16")
    base_dir = args.out_dir / "base"
    for tag, out in [("base", base_dir)] + [(f"expert{i}", args.out_dir / f"expert{i}")
                                             for i in range(1, args.experts + 1)]:
        if (out / "model.safetensors.index.json").is_file():
            print(f"{out}: present, skipped")
            continue
        print(f"{out}: writing")
        write_model(out, cfg, tag, None if tag == "base" else base_dir, args.noise)
    loaded = AutoConfig.from_pretrained(base_dir)
    assert loaded.architectures == ["LlamaForCausalLM"] and loaded.hidden_size == 2048, loaded
    print(f"transformers loads {base_dir}/config.json: {loaded.model_type}, {loaded.num_hidden_layers} layers")


if __name__ == "__main__":
    main()
