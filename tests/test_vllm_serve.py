"""``so8t serve --engine vllm`` as users run it: ``.venv-vllm/bin/so8t serve`` on 127.0.0.1 with a demo run
(``--adapter``: exported on the fly into the cache, a gated Phi-3) and a safety judge, driven with the
``openai`` client and httpx. It answers what the HF engine answers for the same run (greedy), streams the
same text, keeps /think's thinking hash, /v1/models, cancellation on disconnect and the judge's fail-closed
verdicts, writes one audit row per request that ``so8t audit verify`` accepts, and drains on SIGTERM.
One vLLM engine for the module (its start is the slow part: 25 s idle, minutes on a loaded machine).
"""

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from safetensors.torch import load_file, save_file
from serve_helpers import complete, one_torch_thread, wait_for_health  # noqa: F401 (autouse)
from vllm_helpers import ENGINE_START_S, VLLM_PYTHON, VLLM_SO8T, require_vllm, vllm_environment

from child_processes import ChildProcess, started
from cli_helpers import run_so8t, train
from so8t.audit.log import read_rows
from so8t.judge.judge import ALLOW, SafetyJudge
from so8t.serve.engines.hf import HFEngine
from so8t.serve.engines.vllm import cpu_kv_cache_bytes, end_token_ids
from so8t.serve.thinking import parse_thinking, sha256_text

NAN_BYTE = "~"  # the judge's embedding row of this byte is NaN: a prompt with it gets a NaN verdict
CANDIDATES = ["What is 16 + 25?", "Tell me a joke.", "Name a colour.", "Hello there", "Count to three.",
              "What day is it?", "Say something nice.", "Describe the sea."]
NEW_TOKENS = 16
pytestmark = pytest.mark.timeout(1500)  # the server's vLLM engine: 25 s to start idle, minutes under load


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("vllm-serve") / "run"
    # 40 steps: enough for the demo to write thinking-shaped text (after 3 it writes only spaces).
    assert train(["--model", "demo", "--max-steps", "40", "--save-steps", "0", "--warmup-steps", "5", "--theta-init-std", "0.3",
                  "--batch-size", "4", "--max-length", "64", "--no-monitor", "--output-dir", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> Path:
    """A demo judge whose embedding of NAN_BYTE is NaN: its other verdicts stay usable."""
    output = tmp_path_factory.mktemp("vllm-serve") / "judge"
    assert train(["--task", "classify", "--model", "demo", "--max-steps", "3", "--save-steps", "0", "--no-monitor",
                  "--output-dir", str(output)]) == 0
    weights = load_file(output / "model.safetensors")
    token = SafetyJudge.load(output).tokenizer.convert_tokens_to_ids(NAN_BYTE)
    weights["model.embed_tokens.weight"][token] = float("nan")
    save_file(weights, output / "model.safetensors", metadata={"format": "pt"})
    return output


@pytest.fixture(scope="module")
def allowed(judge) -> str:
    """A prompt the judge ALLOWs (its verdicts are argmaxes: --safety-threshold 0)."""
    loaded = SafetyJudge.load(judge, threshold=0.0)
    verdicts = {prompt: loaded.judge(prompt) for prompt in CANDIDATES}
    assert loaded.judge(f"What is {NAN_BYTE}?").reason == "invalid_output"
    chosen = [prompt for prompt, verdict in verdicts.items() if verdict.label == ALLOW]
    assert chosen, f"the judge allows none of {CANDIDATES}: {verdicts}"
    return chosen[0]


@pytest.fixture(scope="module")
def hf(run):
    engine = HFEngine.load("demo", str(run))
    yield engine
    engine.shutdown()


class Server:
    def __init__(self, url: str, child: ChildProcess, audit_db: Path, cache: Path):
        self.url, self.child, self.audit_db, self.cache = url, child, audit_db, cache
        self.requests = 0  # requests sent, each of which must leave one audit row


@pytest.fixture(scope="module")
def server(run, judge, tmp_path_factory):
    require_vllm()
    folder = tmp_path_factory.mktemp("vllm-server")
    audit_db, cache = folder / "audit" / "audit.db", folder / "cache"
    env = vllm_environment(folder)
    env["SO8T_CACHE_DIR"] = str(cache)  # where --adapter's export goes
    del env["VLLM_CPU_KVCACHE_SPACE"]  # the server sizes its KV cache itself
    command = [str(VLLM_SO8T), "serve", "--engine", "vllm", "--adapter", str(run), "--safety-model", str(judge),
               "--safety-threshold", "0", "--port", "0", "--audit-db", str(audit_db), "--enforce-eager",
               "--max-queue", "8", "--max-model-len", "512"]
    with started(command, folder / "logs", env=env) as child:
        url = child.wait_for_stdout(r"^so8t serve: \S+ on (http://127\.0\.0\.1:\d+) ", ENGINE_START_S).group(1)
        wait_for_health(url, process=child.process)
        yield Server(url, child, audit_db, cache)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


@pytest.mark.parametrize("arguments, message", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size is an option of --engine vllm"),
    (["--enforce-eager"], "--enforce-eager is an option of --engine vllm"),
    (["--max-model-len", "512"], "--max-model-len is an option of --engine vllm"),
    (["--engine", "vllm"], "--engine vllm serves a model folder: --model DIR"),
    (["--engine", "vllm", "--model", "demo"], "--engine vllm serves a model folder"),
    (["--engine", "vllm", "--adapter", "no-such-run"], "no-such-run: no such directory"),
], ids=["tp-without-vllm", "eager-without-vllm", "max-model-len-without-vllm", "default-model", "demo", "missing-run"])
def test_engine_options_that_cannot_serve_are_one_line_exit_2(arguments, message, tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "vllm" else
                        real_find_spec(name, *rest))  # as in .venv-vllm, without starting anything
    audit_db = tmp_path / "audit" / "audit.db"
    assert run_so8t("serve", [*arguments, "--port", "0", "--audit-db", str(audit_db)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("so8t serve: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "audit").exists()


def test_without_vllm_installed_the_vllm_engine_names_the_environment_that_has_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "vllm" else
                        real_find_spec(name, *rest))
    assert run_so8t("serve", ["--engine", "vllm", "--model", str(tmp_path), "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "so8t serve: error: --engine vllm: vLLM is not installed in this environment (scripts/setup.sh installs "
        "it into .venv-vllm: run .venv-vllm/bin/so8t serve --engine vllm)")


def expected(hf, prompt, new_tokens: int = NEW_TOKENS):
    """The HF engine's greedy completion on the same run, and its parse as the server answers it."""
    completion = complete(hf, prompt, new_tokens)
    return completion, parse_thinking(completion.text, hf.encode(prompt, new_tokens).opens_thinking)


def test_chat_answers_what_the_hf_engine_answers(server, hf, allowed):
    name = httpx.get(f"{server.url}/health").json()["model"]
    assert [model.id for model in client(server).models.list().data] == [name]
    completion = client(server).chat.completions.create(model=name, messages=chat(allowed), max_tokens=NEW_TOKENS,
                                                        temperature=0)
    server.requests += 1
    reference, parsed = expected(hf, chat(allowed))
    assert reference.logit_stats.exact() == ["mean", "std", "min", "max", "nonfinite"]  # the HF engine's: all
    extension = completion.model_extra["so8t"]
    assert completion.choices[0].message.content == parsed.answer
    assert (extension["thinking_sha256"], extension["thinking_parse"]) == (parsed.thinking_sha256, parsed.case)
    assert extension["outcome"] == "answered" and extension["safety"]["label"] == ALLOW
    monitor = extension["monitor"]
    assert monitor["exact_logit_stats"] == ["logit_max"] and monitor["logit_mean"] is None
    assert monitor["logit_nonfinite"] is None and monitor["generated_tokens"] == reference.new_tokens
    assert monitor["logit_max"] == pytest.approx(reference.logit_stats.max, abs=1e-3)
    assert monitor["sigma_alpha"] == pytest.approx({str(k): v for k, v in reference.sigma_alpha.items()}, abs=1e-6)

    chunks = list(client(server).chat.completions.create(model=name, messages=chat(allowed), max_tokens=NEW_TOKENS,
                                                         temperature=0, stream=True))
    server.requests += 1
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == parsed.answer
    assert chunks[-1].model_extra["so8t"]["thinking_sha256"] == parsed.thinking_sha256


def test_think_returns_the_thinking_and_its_hash(server, hf, allowed):
    response = httpx.post(f"{server.url}/think", json={"prompt": allowed, "max_new_tokens": NEW_TOKENS,
                                                       "temperature": 0, "return_thinking": True}, timeout=300)
    server.requests += 1
    body = response.json()
    reference, parsed = expected(hf, allowed)
    assert response.status_code == 200 and body["outcome"] == "answered", body
    assert (body["answer"], body["thinking"], body["thinking_parse"]) == (parsed.answer, parsed.thinking, parsed.case)
    assert body["thinking_sha256"] == sha256_text(body["thinking"]) == parsed.thinking_sha256
    assert body["monitor"]["logit_max"] == pytest.approx(reference.logit_stats.max, abs=1e-3)


def test_a_nan_verdict_escalates_without_generating(server):
    response = httpx.post(f"{server.url}/think", json={"prompt": f"What is {NAN_BYTE}?", "max_new_tokens": 8},
                          timeout=300)
    server.requests += 1
    body = response.json()
    assert body["outcome"] == "escalated" and body["safety"]["reason"] == "invalid_output"
    assert body["answer"] is None and "monitor" not in body


def test_a_client_that_hangs_up_cancels_its_generation(server, allowed):
    name = httpx.get(f"{server.url}/health").json()["model"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=300, json={
            "model": name, "messages": chat(allowed), "max_tokens": 400, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    server.requests += 1
    request_id = json.loads(first[len("data: "):])["id"].removeprefix("chatcmpl-")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = [row for row in read_rows(server.audit_db) if row.request_id == request_id]
        if rows:
            break
        time.sleep(0.2)
    assert rows and rows[0].outcome == "cancelled" and rows[0].status == 499
    assert httpx.get(f"{server.url}/health").json()["queue_depth"] == 0


def test_the_kv_cache_is_sized_for_the_batch_not_for_the_whole_machine(server):
    (config,) = server.cache.glob("exports/**/config.json")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    size = cpu_kv_cache_bytes(json.loads(config.read_text()), 16, memory, 512)  # --max-batch 16, the default
    assert f"vLLM KV cache on CPU: {size / 2**30:.2f} GiB" in server.child.stderr


def test_a_cpu_kv_cache_holds_the_batch_within_a_quarter_of_the_memory():
    smollm2 = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
               "max_position_embeddings": 8192, "dtype": "float32"}
    one_sequence = 2 * 30 * 3 * 64 * 4 * 8192  # keys and values of 8192 tokens: 360 MiB
    assert cpu_kv_cache_bytes(smollm2, 16, 64 * 2**30) == 16 * one_sequence
    assert cpu_kv_cache_bytes(smollm2, 16, 8 * 2**30) == 2 * 2**30
    assert cpu_kv_cache_bytes(smollm2, 16, 2**30) == one_sequence  # a quarter would not hold one sequence
    assert cpu_kv_cache_bytes({**smollm2, "dtype": "bfloat16"}, 1, 64 * 2**30) == one_sequence // 2
    assert cpu_kv_cache_bytes({**smollm2, "head_dim": 32}, 1, 64 * 2**30) == one_sequence // 2
    assert cpu_kv_cache_bytes(smollm2, 16, 64 * 2**30, max_model_len=512) == one_sequence  # 16 × 512 tokens


@pytest.mark.parametrize("generation_config, expected", [
    ({"eos_token_id": [32000, 32001, 32007]}, [32000, 32001, 32007]),  # Phi-3-mini: <|end|> ends a turn
    ({"eos_token_id": 2}, [2, 32000]),
    ({}, [32000]),
    (None, [32000]),  # no generation_config.json: the tokenizer's end token
])
def test_an_answer_ends_at_every_end_token_of_the_generation_config(generation_config, expected, tmp_path):
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    assert end_token_ids(tmp_path, 32000) == expected


def test_sigterm_drains_and_every_request_has_a_verified_audit_row(server, capsys):
    server.child.send(signal.SIGTERM)
    assert server.child.wait(120) == 0, server.child.stderr[-4000:]
    rows = read_rows(server.audit_db)
    assert len(rows) == server.requests
    assert run_so8t("audit", ["verify", str(server.audit_db)]) == 0, capsys.readouterr()


def test_vllm_serve_itself_serves_the_export_with_its_gates(run, tmp_path):
    """vLLM's own server, which knows nothing of so8t but the plugin its entry point loads, on what so8t
    export wrote, compiled (torch.compile of the model with the gates' custom ops in it, not
    --enforce-eager: 25 s more here): its greedy tokens through the OpenAI completions API are
    transformers' on the export."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "export"
    assert run_so8t("export", [str(run), "--output-dir", str(export)]) == 0
    prompt = AutoTokenizer.from_pretrained(export).apply_chat_template(
        chat(CANDIDATES[0]), add_generation_prompt=True, return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Not the `vllm serve` script: vllm-cpu 0.32.0's asks for the version of a package named vllm, and fails.
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--dtype",
               "float32", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512",
               "--served-model-name", "gated"]
    with started(command, tmp_path / "logs", env=vllm_environment(tmp_path)) as child:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + ENGINE_START_S
        while not _answers(f"{url}/health"):
            assert child.process.poll() is None, child.stderr[-4000:]
            assert time.monotonic() < deadline, child.stderr[-4000:]
            time.sleep(0.5)
        vllm_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        completion = vllm_client.completions.create(model="gated", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert completion.choices[0].model_extra["token_ids"] == tokens[len(prompt):]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False

