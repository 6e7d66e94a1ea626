"""Security of artifacts and secrets: safetensors only (pickles need --allow-pickle), no remote code, API keys
never written anywhere, serve on loopback unless told otherwise."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
from support.cli import ROOT, run_cli
from support.fault_server import running_fault_server

from toolkit.errors import EXIT_ROWS_FAILED, UserError

pytestmark = pytest.mark.timeout(180)


class _Payload:
    """Unpickling this runs code: it creates the marker file (what a hostile pytorch_model.bin could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def hostile_pickle_dir(tiny_llama_dir, tmp_path) -> tuple[Path, Path]:
    model = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return model, marker


def test_pickled_weights_are_refused_by_every_loader(hostile_pickle_dir, tiny_llama_dir):
    from rlhf.policy import load_critic
    from toolkit.models import load_causal_lm, load_tokenizer
    from toolkit.reward.model import new_reward_model

    model, marker = hostile_pickle_dir
    for load in (load_causal_lm, new_reward_model, lambda m: load_critic(str(m), "rules", load_tokenizer(m))):
        with pytest.raises(UserError, match="--allow-pickle"):
            load(model)
    assert not marker.exists()


def test_pickled_weights_through_the_cli_need_allow_pickle(hostile_pickle_dir, tiny_llama_dir, tmp_path):
    model, marker = hostile_pickle_dir
    proc = run_cli("ask", "hi", "--teacher", f"hf:{model}", "--max-tokens", "2", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: '{model}' has no *.safetensors weights (pickled weights "
                                                "are not loaded: convert them to safetensors, or pass "
                                                "--allow-pickle if you trust the file)"]
    assert not marker.exists()
    # a user who trusts a plain state-dict pickle can opt in
    import torch
    from safetensors.torch import load_file

    trusted = tmp_path / "trusted"
    shutil.copytree(model, trusted)
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), trusted / "pytorch_model.bin")
    ok = run_cli("ask", "hi", "--teacher", f"hf:{trusted}", "--max-tokens", "2", "--allow-pickle", "--json",
                 timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["completion_tokens"] == 2


def test_remote_code_in_a_model_dir_never_runs(tiny_llama_dir, tmp_path):
    from toolkit.models import load_causal_lm

    marker = tmp_path / "pwned"
    code = f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
    for model_type in ("llama", "llamakit-evil"):
        model = tmp_path / model_type
        shutil.copytree(tiny_llama_dir, model)
        config = json.loads((model / "config.json").read_text())
        config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                       "AutoModelForCausalLM": "evil.EvilModel"})
        (model / "config.json").write_text(json.dumps(config))
        (model / "evil.py").write_text(code)
        if model_type == "llama":
            load_causal_lm(model)  # the built-in LLaMA class, not evil.py
        else:
            with pytest.raises(UserError):
                load_causal_lm(model)
    assert not marker.exists()
    sources = [p for d in ("toolkit", "rlhf") for p in (ROOT / d).rglob("*.py")]
    assert not [p for p in sources if "trust_remote_code=True" in p.read_text(encoding="utf-8")]


SECRET = "sk-llamakit-test-NEVER-WRITE-7f3a9c"


def _files_holding(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_api_keys_are_never_written(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"key-test question {i}"}) + "\n" for i in range(3)) +
                       json.dumps({"prompt": "key-test failing <<faults:always-500>>"}) + "\n")
    out = tmp_path / "out"
    with running_fault_server() as server:
        kwargs = json.dumps({"model": "fault", "base_url": server.url, "api_key": SECRET, "max_retries": 0})
        runs = [
            run_cli("generate-data", "conversations", "--prompts", prompts, "--out", out / "openai.jsonl",
                    "--teacher", "openai:fault", "--base-url", server.url, "--max-retries", "0", "--export",
                    "sharegpt", "--json", env={"OPENAI_API_KEY": SECRET}, timeout=120),
            run_cli("generate-data", "conversations", "--prompts", prompts, "--out", out / "custom.parquet",
                    "--teacher", "openai:fault", "--base-url", server.url, "--api-key-env", "MY_KEY",
                    "--max-retries", "0", "--format", "parquet", env={"MY_KEY": SECRET}, timeout=120),
            run_cli("generate-data", "preferences", "--prompts", prompts, "--out", out / "lc.jsonl", "--teacher",
                    "langchain:langchain_openai:ChatOpenAI", "--teacher-kwargs", kwargs, "--num-candidates", "2",
                    "--scorer", "rules:length", "--max-retries", "0", timeout=120),
        ]
    for proc in runs:
        assert proc.returncode == EXIT_ROWS_FAILED, proc.stderr  # finished; the always-500 row failed
        assert SECRET not in proc.stdout + proc.stderr
    assert (out / "openai.jsonl").is_file() and (out / "openai.failed.jsonl").is_file()
    assert (out / "custom.parquet").is_file() and (out / "lc.jsonl").is_file()
    assert not _files_holding(out, SECRET)


def test_serve_keeps_its_key_out_of_logs_and_binds_loopback(tiny_llama_dir, tmp_path):
    import httpx

    from toolkit.commands.serve import serve_cmd
    from toolkit.server_process import running_server

    assert next(p for p in serve_cmd.params if p.name == "host").default == "127.0.0.1"
    log = tmp_path / "serve.log"
    with running_server(str(tiny_llama_dir), args=("--api-key-env", "SERVE_KEY"), env={"SERVE_KEY": SECRET},
                        log_file=log) as server:
        listening = _listening_addresses(server.port)
        headers = {"Authorization": f"Bearer {SECRET}"}
        body = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(f"{server.url}/chat/completions", json=body, headers=headers, timeout=60).status_code == 200
        wrong = {"Authorization": f"Bearer {SECRET}-wrong"}
        assert httpx.post(f"{server.url}/chat/completions", json=body, headers=wrong, timeout=60).status_code == 401
    assert listening == {"127.0.0.1"}
    assert log.read_text() and SECRET not in log.read_text()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (Linux /proc/net/tcp*, state 0A = LISTEN)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                # /proc stores each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found
