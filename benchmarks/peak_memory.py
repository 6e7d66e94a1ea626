"""What a real `llamakit sft` run adds to a process's resident memory at its peak while it trains (Linux): run as a
script in a fresh process, so nothing else has touched the heap. Prints one JSON line {"delta_bytes",
"baseline_bytes", "with_save_bytes"}. The training peak is read when the last step is done, before the final save:
`llamakit plan` estimates GPU memory, and on a GPU the save's copies (a merged LoRA model, serialisation buffers)
are made in host memory; `with_save_bytes` is the whole run's peak, for the record.

    python benchmarks/peak_memory.py MODEL_DIR DATA OUT BATCH_SIZE MAX_LENGTH [--lora]

Under `accelerate launch` (a DeepSpeed preset) each rank runs it and prints its own line.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import re
import sys
from pathlib import Path


def status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of this process, from /proc."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    model, data, out, batch_size, max_length = sys.argv[1:6]
    import toolkit.sft
    from toolkit.models import load_tokenizer
    from toolkit.sft import SFTConfig, train_sft

    training_peak: list[int] = []
    finish = toolkit.sft._finish

    def finish_after_reading_the_peak(*args, **kwargs):
        training_peak.append(status_bytes("VmHWM"))
        return finish(*args, **kwargs)

    toolkit.sft._finish = finish_after_reading_the_peak

    load_tokenizer(model)  # the tokenizer and every import are in the baseline: not the run's memory
    if importlib.util.find_spec("deepspeed") is not None:
        # Accelerate imports DeepSpeed during the run whenever it is installed (~300 MB of modules): not the
        # run's memory either
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
    gc.collect()
    baseline = status_bytes("VmRSS")
    train_sft(SFTConfig(data=data, model=model, out=out, max_steps=2, batch_size=int(batch_size),
                        max_length=int(max_length), lora="--lora" in sys.argv, seed=0, warmup_ratio=0.0))
    print(json.dumps({"delta_bytes": training_peak[0] - baseline, "baseline_bytes": baseline,
                      "with_save_bytes": status_bytes("VmHWM") - baseline}))


if __name__ == "__main__":
    main()
