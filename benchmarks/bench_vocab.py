"""Time a union-vocabulary linear merge against the plain linear merge on the 748M models.

Issue 12's target: the 748M benchmark (base + 4 experts, vocab 32000, untied lm_head) with 256
added tokens in one expert; ``tokenizer_source: union`` must stay within 1.3x of the plain
linear merge's time. The benchmark models carry no tokenizer, so this script gives them one: a
word-level tokenizer of 32000 tokens (``tokenizers``), copied beside hard links to the weights
in ``benchmarks/out/vocab/``. The expert with added tokens (``expert4+256``) gets 256 more
embedding and lm_head rows (rewritten shards) and the 256 tokens as added special tokens.

Same measurement as ``bench_merge.py`` (its own process under ``/usr/bin/time -v``, waits for
idle CPUs, records other processes' CPU seconds; minimum wall time of the quiet runs).

    python benchmarks/make_llama_748m.py
    python benchmarks/bench_vocab.py [--repeats 2] [--threads 1]      # -> results/vocab_748m.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import HERE, MODELS, git_head, run_meta, timed, warm_cache  # noqa: E402

ADDED = 256
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
TARGET_RATIO = 1.3


def tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` tokens (<unk> <s> </s> then w00003...)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i:05d}" for i in range(3, vocab_size)]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def prepare(data: Path, root: Path) -> dict[str, Path]:
    """Model directories with tokenizers: expert1..4 (weights linked) and expert4+256."""
    base_tokenizer = tokenizer(32000)
    dirs = {}
    for name in MODELS:
        target = dirs[name] = root / name
        if not (target / "tokenizer.json").is_file():
            target.mkdir(parents=True, exist_ok=True)
            for item in (data / name).iterdir():  # hard links: mergelab opens no symlinked shards
                if not (target / item.name).exists():
                    os.link(item, target / item.name)
            base_tokenizer.save_pretrained(target)
    plus = dirs["expert4+256"] = root / "expert4+256"
    if not (plus / "tokenizer.json").is_file():
        shutil.rmtree(plus, ignore_errors=True)
        plus.mkdir(parents=True)
        source = data / MODELS[-1]
        generator = torch.Generator().manual_seed(0)
        for shard in sorted(source.glob("*.safetensors")):
            with safe_open(shard, "pt") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
            for name in VOCAB_TENSORS:
                if name in tensors:
                    rows = tensors[name]
                    extra = (torch.randn((ADDED, rows.shape[1]), generator=generator) * 0.02).to(rows.dtype)
                    tensors[name] = torch.cat([rows, extra])
            save_file(tensors, plus / shard.name, metadata={"format": "pt"})
            del tensors
        index = json.loads((source / "model.safetensors.index.json").read_text())
        index["metadata"]["total_size"] += 2 * ADDED * 2048 * 2  # two bf16 tensors of hidden 2048
        (plus / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((source / "config.json").read_text())
        config["vocab_size"] = 32000 + ADDED
        (plus / "config.json").write_text(json.dumps(config, indent=2))
        from tokenizers import AddedToken

        grown = tokenizer(32000)
        grown.add_tokens([AddedToken(f"<|tool_{i}|>", special=True, normalized=False) for i in range(ADDED)],
                         special_tokens=True)
        grown.save_pretrained(plus)
    return dirs


def write_configs(dirs: dict[str, Path], out: Path) -> dict[str, Path]:
    common = "dtype: float32\nout_dtype: bfloat16\n"
    plain = [dirs[m] for m in MODELS]
    union = [dirs[m] for m in MODELS[:-1]] + [dirs["expert4+256"]]
    texts = {
        "linear": "merge_method: linear\nmodels:\n" + "".join(
            f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in plain) + common,
        "linear union": "merge_method: linear\ntokenizer_source: union\nmodels:\n" + "".join(
            f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in union) + common,
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = out / f"vocab-{name.replace(' ', '-')}.yml"
        paths[name].write_text(text)
    return paths


def check_union(out_dir: Path, dirs: dict[str, Path]) -> dict:
    """An added token's rows are expert4+256's (only it has them); a shared token's the mean."""
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out_dir).get_vocab()

    def file_of(directory: Path, name: str) -> Path:
        index = directory / "model.safetensors.index.json"
        return directory / (json.loads(index.read_text())["weight_map"][name] if index.is_file() else
                            "model.safetensors")

    def rows(directory: Path, name: str, ids: list[int]) -> torch.Tensor:
        with safe_open(file_of(directory, name), "pt") as handle:
            return handle.get_slice(name)[ids[0]:ids[-1] + 1].float()

    name = "lm_head.weight"
    with safe_open(file_of(out_dir, name), "pt") as handle:
        merged = handle.get_tensor(name).float()
    added = vocab["<|tool_7|>"]
    own = rows(dirs["expert4+256"], name, [32007])
    shared = torch.stack([rows(dirs[m], name, [100]) for m in MODELS[:-1]] + [rows(dirs["expert4+256"], name, [100])])
    expected_shared = shared.mean(0).to(torch.bfloat16).float()
    return {"rows": merged.shape[0], "added_token_id": added,
            "added_row_ok": bool(torch.equal(merged[added:added + 1], own.to(torch.bfloat16).float())),
            "shared_row_max_diff": float((merged[100:101] - expected_shared).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE / "data", help="made by make_llama_748m.py")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="model dirs, configs and merge outputs")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "vocab_748m.json")
    parser.add_argument("--repeats", type=int, default=2, help="quiet runs wanted per case")
    parser.add_argument("--max-runs", type=int, default=4, help="most runs per case while waiting for quiet ones")
    parser.add_argument("--threads", type=int, default=1, help="mergelab merge --threads")
    parser.add_argument("--max-wait", type=float, default=300, help="seconds to wait for an idle machine per run")
    args = parser.parse_args()
    args.env, args.mergekit_venv = {"OMP_NUM_THREADS": str(args.threads)}, None
    args.data = args.data.resolve()
    if not (args.data / MODELS[-1] / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_llama_748m.py"), str(args.data)], check=True)
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = prepare(args.data, args.out / "vocab")
    configs = write_configs(dirs, args.out)
    warm_cache(args.data)
    subprocess.run(["cat"] + [str(f) for f in (args.out / "vocab" / "expert4+256").glob("*.safetensors")],
                   stdout=subprocess.DEVNULL, check=True)
    mergelab = [str(Path(sys.executable).parent / "mergelab"), "merge"]
    results = {}
    for case, config in configs.items():
        out_dir = args.out / f"vocab-out-{case.replace(' ', '-')}"
        command = mergelab + [str(config), str(out_dir), "--threads", str(args.threads), "--quiet", "--force"]
        print(f"{case}: {' '.join(command)}", flush=True)
        runs, check = [], None
        while sum(r["quiet"] for r in runs) < args.repeats and len(runs) < max(args.repeats, args.max_runs):
            shutil.rmtree(out_dir, ignore_errors=True)
            os.sync()
            run = timed(command, args.max_wait, args.env)
            runs.append(dict(run, quiet=run["others_cpu_s"] <= 0.1 * run["wall_s"] * os.cpu_count()))
            print(f"  {case}: {runs[-1]}", flush=True)
            if check is None and case == "linear union":
                check = check_union(out_dir, dirs)
                print(f"  check: {check}", flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
        best = min(runs, key=lambda r: r["wall_s"])
        results[case] = {"command": command, "commit": git_head(), "runs": runs, "wall_s": best["wall_s"],
                         "peak_rss_gb": max(r["peak_rss_gb"] for r in runs), "check": check}
    ratio = results["linear union"]["wall_s"] / results["linear"]["wall_s"]
    summary = {"ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
    print(f"| case | wall s (min) | peak RSS GB | runs: wall s (others' CPU s) |\n|---|---:|---:|---|")
    for case, r in results.items():
        walls = ", ".join(f"{x['wall_s']:.1f} ({x['others_cpu_s']:.0f})" for x in r["runs"])
        print(f"| {case} | {r['wall_s']:.1f} | {r['peak_rss_gb']:.2f} | {walls} |")
    print(f"union / plain: {ratio:.2f}x (target <= {TARGET_RATIO}x)")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"meta": run_meta(args), "summary": summary, "results": results}, indent=2)
                            + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
