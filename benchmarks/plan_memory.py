"""`llamakit plan`'s estimate against the peak memory of real `llamakit sft` runs on this CPU: without DeepSpeed
(one process) and under the shipped ZeRO-2 / ZeRO-3 presets on 2 ranks, for random LLaMAs of 30M, 82M
and 176M parameters (SmolLM2's 49k vocabulary), full fine-tuning and LoRA.

    .venv/bin/python benchmarks/plan_memory.py                # 18 runs
    .venv/bin/python benchmarks/plan_memory.py --size 176M    # one size's 6 runs
    .venv/bin/python benchmarks/plan_memory.py --quick        # the 82M model only, full fine-tuning (3 runs)

Each run: 2 steps, batch 2 × 256 tokens (every row longer, so each batch is whole), fp32, 1 torch thread per
process, glibc's mmap threshold fixed at 64 KiB (see measured_peak). Measured: what the run adds to a process's
resident memory at its training peak (benchmarks/peak_memory.py; the highest of the ranks). Estimated: `llamakit
plan --stage sft` with the same model, batch, length, ZeRO stage and number of ranks, fp32, and no CUDA context
(framework 0). error = estimated / measured − 1.
Prints a table on stderr and ONE JSON line: {"cases": [{"model", "parameters", "zero", "lora", "measured_mib",
"estimated_mib", "error"}], "worst_error"}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"30M": (384, 6), "82M": (640, 10), "176M": (1024, 12)}
BATCH, LENGTH = 2, 256
MIB = 2**20


def long_conversations(path: Path) -> Path:
    """Every row longer than LENGTH tokens: each batch is exactly BATCH × LENGTH, as the estimate assumes."""
    rows = [{"messages": [{"role": "user", "content": f"Tell me about topic {i}."},
                          {"role": "assistant", "content": " ".join(f"word{j}" for j in range(400))}]}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def random_llama(out: Path, size: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.support.tiny_models import save_tiny_llama

    hidden, layers = SIZES[size]
    return save_tiny_llama(out, hidden=hidden, layers=layers, heads=hidden // 64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_peak(model: Path, data: Path, out: Path, lora: bool, zero: int) -> int:
    """Bytes a real 2-step `sft` adds at its training peak: one process, or the highest of 2 ZeRO ranks."""
    script = [str(ROOT / "benchmarks" / "peak_memory.py"), str(model), str(data), str(out), str(BATCH), str(LENGTH),
              *(["--lora"] if lora else [])]
    # glibc's malloc keeps freed memory of its growing mmap threshold in the heap: the peak would then hold
    # whatever it kept (here 1135 to 1311 MiB for one LoRA run, 20 % apart), not the tensors the estimate counts
    # (on a GPU the caching allocator's share is the estimate's framework term). A fixed threshold gives every
    # tensor over 64 KiB its own mapping, returned when it is freed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    if zero:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
        env.pop("RANK", None)
        command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                   str(ROOT / "templates" / "accelerate" / f"deepspeed-zero{zero}.yaml"), "--num_processes", "2",
                   "--main_process_port", str(_free_port()), *script]
    else:
        command = [sys.executable, *script]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    # found anywhere, not line by line: the two ranks share the pipe and one's newline can land after the other's line
    lines = [json.loads(found) for found in re.findall(r'\{"delta_bytes"[^{}]*\}', proc.stdout)]
    if len(lines) != (2 if zero else 1):
        raise RuntimeError(f"expected a line per rank, got {proc.stdout[-2000:]}")
    return max(line["delta_bytes"] for line in lines)


def estimated(model: Path, lora: bool, zero: int) -> float:
    from toolkit.plan import PlanConfig, estimate

    return estimate(PlanConfig(stage="sft", model=str(model), lora=lora, zero=zero, gpus=2 if zero else 1,
                               bf16=False, batch_size=BATCH, max_length=LENGTH, framework_gib=0)).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 82M model, full fine-tuning only")
    parser.add_argument("--size", action="append", choices=list(SIZES), help="only these sizes (repeatable)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from toolkit.plan import shape_of

    cases = [(size, zero, lora) for size in (["82M"] if args.quick else args.size or SIZES) for lora in
             ([False] if args.quick else [False, True]) for zero in (0, 2, 3)]
    results = []
    with tempfile.TemporaryDirectory(prefix="plan-memory-") as tmp:
        work = Path(tmp)
        data = long_conversations(work / "long.jsonl")
        for i, (size, zero, lora) in enumerate(cases):
            model = work / f"model-{size}"
            if not model.exists():
                random_llama(model, size)
            measured = measured_peak(model, data, work / f"run-{i}", lora, zero)
            plan_bytes = estimated(model, lora, zero)
            results.append({"model": size, "parameters": shape_of(str(model)).parameters, "zero": zero, "lora": lora,
                            "measured_mib": round(measured / MIB), "estimated_mib": round(plan_bytes / MIB),
                            "error": round(plan_bytes / measured - 1, 3)})
            r = results[-1]
            print(f"{size:>4} ZeRO-{zero} {'LoRA' if lora else 'full':>4}: measured {r['measured_mib']:5d} MiB, "
                  f"estimated {r['estimated_mib']:5d} MiB ({r['error']:+.0%})", file=sys.stderr, flush=True)
    print(json.dumps({"cases": results, "worst_error": max((r["error"] for r in results), key=abs)}))


if __name__ == "__main__":
    main()
