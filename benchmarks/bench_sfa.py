"""SFA's cost: training throughput with SFA (p = 0.25, and p = 0.01 as a worst case) against
plain fine-tuning, in a plain PyTorch loop and inside transformers.Trainer, on tiny Llama-shape
models; plus the memory SFA adds (one copy of the floating-point state).

Methods run interleaved (plain, SFA, plain, SFA, ...) on identical batches and the median
throughput of --repeats runs counts. On CPU the clock is the process's CPU time
(``time.process_time``), which other jobs on a shared machine disturb far less than wall time;
on CUDA it is wall time after a synchronize. Because noise can still exceed the effect, the
time spent inside ``maybe_average`` is also measured directly, as a share of the loop's time.
Prints a markdown table and writes benchmarks/results/sfa.json.

    python benchmarks/bench_sfa.py [--steps 100] [--repeats 5] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mergelab.continual import SFA, SFACallback
from mergelab.lm import tiny_llama

HERE = Path(__file__).resolve().parent
SIZES = {  # name: (vocab, hidden, layers, heads, intermediate, batch, sequence)
    "tiny (demo)": (20, 64, 2, 4, 128, 32, 16),
    "small": (2000, 256, 4, 8, 688, 8, 32),
}


def make_batches(vocab: int, batch: int, length: int, count: int, device) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        ids = torch.randint(4, vocab, (batch, length), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    return time.perf_counter if torch.device(device).type == "cuda" else time.process_time


def plain_loop(model, batches, sfa: SFA | None, device) -> tuple[float, float]:
    """(seconds for the loop, seconds inside maybe_average)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    averaging = 0.0
    now = clock(device)
    sync(device)
    started = now()
    for step, batch in enumerate(batches, start=1):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sfa is not None:
            tick = now()
            sfa.maybe_average(model, step)
            sync(device)
            averaging += now() - tick
    sync(device)
    return now() - started, averaging


def trainer_loop(model, batches, callback, device, out_dir: Path) -> float:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    rows = [{"input_ids": ids, "labels": ids} for batch in batches for ids in batch["input_ids"].cpu()]
    args = TrainingArguments(output_dir=str(out_dir), max_steps=len(batches),
                             per_device_train_batch_size=batches[0]["input_ids"].shape[0], learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             train_sampling_strategy="sequential", use_cpu=torch.device(device).type == "cpu",
                             remove_unused_columns=False, dataloader_num_workers=0)
    collate = lambda items: {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "labels")}  # noqa: E731
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback] if callback else [],
                      data_collator=collate)
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics in the table's output
    now = clock(device)
    sync(device)
    started = now()
    trainer.train()
    sync(device)
    return now() - started


def bench_size(name: str, args) -> dict:
    vocab, hidden, layers, heads, intermediate, batch, length = SIZES[name]
    start = tiny_llama(vocab_size=vocab, hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                       seed=0).to(args.device)
    start.config.max_position_embeddings = max(64, length)
    batches = make_batches(vocab, batch, length, args.steps, args.device)
    anchor = copy.deepcopy(start).state_dict()
    params = sum(p.numel() for p in start.parameters())
    cases = {"plain": None, "SFA p=0.25": 0.25, "SFA p=0.01": 0.01}
    times = {case: [] for case in cases}
    inside = {case: [] for case in cases}
    sfa_bytes = 0
    plain_loop(copy.deepcopy(start), batches[:5], None, args.device)  # warm-up
    for _ in range(args.repeats):
        for case, p in cases.items():
            model = copy.deepcopy(start)
            sfa = None if p is None else SFA(anchor, args.steps, p=p, beta=0.5, model=model)
            seconds, averaging = plain_loop(model, batches, sfa, args.device)
            times[case].append(seconds)
            inside[case].append(averaging)
            sfa_bytes = sfa.anchor_bytes() if sfa else sfa_bytes
    plain = statistics.median(times["plain"])
    rows = {}
    for case in cases:
        median = statistics.median(times[case])
        rows[case] = {"steps_per_s": args.steps / median, "overhead_pct": 100 * (median - plain) / plain,
                      "averaging_share_pct": 100 * statistics.median(
                          [a / t for a, t in zip(inside[case], times[case])]),
                      "seconds": times[case]}
    result = {"model": name, "parameters": params, "param_bytes": sum(p.numel() * p.element_size()
                                                                        for p in start.parameters()),
              "sfa_anchor_bytes": sfa_bytes, "batch": batch, "sequence": length, "loop": rows}
    if not args.skip_trainer:
        trainer_times = {"Trainer": [], "Trainer + SFACallback p=0.25": []}
        for _ in range(args.repeats):
            for case in trainer_times:
                callback = SFACallback(p=0.25, beta=0.5) if "SFA" in case else None
                with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output_dir; nothing is saved
                    trainer_times[case].append(trainer_loop(copy.deepcopy(start), batches, callback, args.device,
                                                            Path(scratch)))
        base = statistics.median(trainer_times["Trainer"])
        result["trainer"] = {case: {"steps_per_s": args.steps / statistics.median(values),
                                    "overhead_pct": 100 * (statistics.median(values) - base) / base, "seconds": values}
                             for case, values in trainer_times.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--skip-trainer", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sfa.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [bench_size(name, args) for name in args.sizes]

    print(f"SFA overhead, {args.steps} steps, median of {args.repeats} interleaved runs, device {args.device}, "
          f"{args.threads} thread(s), {'wall' if torch.device(args.device).type == 'cuda' else 'CPU'} time\n")
    print("| model | params | loop | steps/s | overhead vs plain | time inside maybe_average |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for case, row in result["loop"].items():
            print(f"| {result['model']} | {result['parameters'] / 1e6:.2f}M | {case} | {row['steps_per_s']:.1f} | "
                  f"{row['overhead_pct']:+.1f}% | {row['averaging_share_pct']:.2f}% |")
        for case, row in result.get("trainer", {}).items():
            print(f"| {result['model']} | {result['parameters'] / 1e6:.2f}M | {case} | {row['steps_per_s']:.1f} | "
                  f"{row['overhead_pct']:+.1f}% | |")
    print("\nmemory: the SFA anchor holds " + ", ".join(
        f"{r['sfa_anchor_bytes'] / 1e6:.2f} MB for {r['param_bytes'] / 1e6:.2f} MB of parameters ({r['model']})"
        for r in results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": args.device,
        "device_name": (torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
                        else platform.processor()),
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "results": results,
    }, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
