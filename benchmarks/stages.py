"""The CLI stages of a benchmark (rlhf_effect.py, method_comparison.py): each a `llamakit ...` command in a process
of its own, timed, with its own peak resident memory, skipped on a rerun once done.

A stage is a child of a fork server that imported torch, transformers, peft and the CLI once (multiprocessing's
"forkserver", which itself runs no torch op: a fork after OpenMP threads have run can hang the child). Each stage
then starts in milliseconds instead of the ~8 s of imports of `python -m toolkit` on this CPU, and runs the same
code through the same entry point (`toolkit.cli.main`). Its peak RSS counts the imported libraries, as a fresh
`llamakit` process's would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "accelerate", "toolkit.cli"]


def log(message: str) -> None:
    print(f"[{Path(sys.argv[0]).stem} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _run_stage(args: list[str], logs: str, name: str, threads: int) -> None:
    """In the forked child: `llamakit ARGS` with its stdout and stderr in the stage's log files, then its peak RSS
    (KiB, of itself and of any process it waited for) in `name.rss`; exits with the command's exit code."""
    os.chdir(ROOT)
    for fd, part in ((1, "out"), (2, "err")):
        file = os.open(os.path.join(logs, f"{name}.{part}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    if threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    from toolkit.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - a crash is the stage's failure, told in its log
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    Path(logs, f"{name}.rss").write_text(str(peak), encoding="utf-8")
    sys.exit(code)  # through multiprocessing's own exit, which releases what the stage registered


class Stages:
    """Runs CLI stages in processes of their own; a stage is done when its marker exists (then it is skipped)."""

    def done(self, name: str) -> bool:
        return (self.out / f".done-{name}").is_file()

    def __init__(self, out: Path, threads: int):
        self.out, self.threads = out, threads
        self.timings_file, self.rss_file = out / "timings.json", out / "peak-rss-mb.json"
        self.seconds: dict[str, float] = (json.loads(self.timings_file.read_text())
                                          if self.timings_file.is_file() else {})
        self.peak_rss_mb: dict[str, float] = (json.loads(self.rss_file.read_text())
                                              if self.rss_file.is_file() else {})
        self._context = None

    def _fork_server(self):
        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(PRELOAD)
        return self._context

    def run(self, name: str, args: list[Any], stdout_json: Path | None = None) -> None:
        self.run_together([(name, args, stdout_json)])

    def run_together(self, jobs: list[tuple[str, list[Any], Path | None]]) -> None:
        """Start the jobs not done yet at once (one torch thread each; a lone job gets `self.threads`,
        0 = torch's default)."""
        self.run_graph([(*job, ()) for job in jobs], slots=max(1, sum(not self.done(job[0]) for job in jobs)))

    def run_graph(self, jobs: list[tuple[str, list[Any], Path | None, tuple[str, ...]]], slots: int) -> None:
        """Run the jobs (name, args, stdout_json, after) at most `slots` at a time, each as soon as every stage it
        comes after is done and a slot is free; among the ready ones, the first in the list goes first, so the
        list orders them by priority (the longest chain first). With more than one slot every job gets one torch
        thread: they share the 2 cores, and OpenMP threads spin against each other. A job after a stage that
        failed never starts; the others finish, then the failures are raised together."""
        for name, *_ in jobs:
            if self.done(name):
                log(f"{name}: done before ({self.seconds.get(name, 0):.0f} s), skipped")
        pending = [job for job in jobs if not self.done(job[0])]
        names = {job[0] for job in jobs}
        for name, _, _, after in pending:
            unknown = [a for a in after if a not in names and not self.done(a)]
            if unknown:
                raise ValueError(f"stage {name} comes after {unknown}, which are neither done nor in the graph")
        threads = 1 if slots > 1 else self.threads
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        running: dict[Any, tuple[str, list[str], Path | None, Any, float]] = {}
        failed: list[str] = []
        while pending or running:
            while not failed and len(running) < slots:
                ready = next((job for job in pending if all(self.done(a) for a in job[3])), None)
                if ready is None:
                    break
                pending.remove(ready)
                name, args, stdout_json, _ = ready
                args = [str(a) for a in args]
                log(f"{name}: llamakit {' '.join(args)}")
                process = self._fork_server().Process(target=_run_stage, args=(args, str(logs), name, threads),
                                                      name=name)
                process.start()
                running[process.sentinel] = (name, args, stdout_json, process, time.perf_counter())
            if not running:
                break  # what is left waits on a stage that failed
            for sentinel in wait(list(running), timeout=None)[:1]:  # one at a time: a freed slot starts the next
                name, args, stdout_json, process, start = running.pop(sentinel)
                process.join()
                seconds = time.perf_counter() - start
                if process.exitcode != 0:
                    sys.stderr.write((logs / f"{name}.err").read_text(encoding="utf-8")[-4000:])
                    failed.append(f"stage {name} failed (exit {process.exitcode}): llamakit {' '.join(args)}")
                    continue
                if stdout_json is not None:
                    lines = (logs / f"{name}.out").read_text(encoding="utf-8").strip().splitlines()
                    stdout_json.write_text(lines[-1] + "\n", encoding="utf-8")
                self.seconds[name] = round(seconds, 3)  # ms: a fast stage (constraints: ~0.05 s) is not 0
                self.peak_rss_mb[name] = round(int((logs / f"{name}.rss").read_text()) / 1024, 1)  # ru_maxrss: KiB
                self.timings_file.write_text(json.dumps(self.seconds, indent=1))
                self.rss_file.write_text(json.dumps(self.peak_rss_mb, indent=1))
                (self.out / f".done-{name}").touch()
                log(f"{name}: {seconds:.0f} s")
        if failed:
            raise SystemExit("\n".join(failed))
        if pending:
            raise ValueError(f"stages {[job[0] for job in pending]} wait on each other")
