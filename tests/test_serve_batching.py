"""Dynamic batching and cancellation: a left-padded batch decodes each row exactly as Hugging Face's
``generate`` decodes it alone (greedy), with per-row max_new_tokens, temperature and stop strings;
concurrent requests share batches; a client that goes away stops its generation and gets a
``cancelled`` audit row."""

import asyncio
import math
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import one_torch_thread, open_audit, running_server, verify  # noqa: F401 (autouse)

from so8t.audit.log import read_rows
from so8t.serve.app import create_app
from so8t.serve.generation import CANCELLED, LENGTH, STOP, GenerationRequest, load_generator

PROMPTS = ["What is 16 + 25?", "hi", "Tell me a long story about a dragon and a knight in a castle far away.",
           "2+2", "Recommend a good book about the sea."]
MAX_NEW = [30, 12, 40, 5, 25]


@pytest.fixture(scope="module")
def generator():
    return load_generator()


def solo_greedy_ids(generator, ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: Hugging Face's generate on the prompt alone, no padding."""
    input_ids = torch.tensor([ids])
    output = generator.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=generator.tokenizer.pad_token_id)
    return output[0, len(ids):].tolist()


@pytest.fixture
def batch_ids(generator, monkeypatch):
    """Records each finished row's generated ids (EOS included), by request."""
    from so8t.serve import generation

    recorded, result = {}, generation.TextGenerator._result

    def recording(self, row, gates):
        recorded[id(row.request)] = list(row.ids)
        return result(self, row, gates)

    monkeypatch.setattr(generation.TextGenerator, "_result", recording)
    return recorded


def test_a_padded_batch_decodes_each_row_as_generate_does_alone(generator, batch_ids):
    requests = [GenerationRequest(generator.encode(prompt, limit), limit) for prompt, limit in zip(PROMPTS, MAX_NEW)]
    requests.insert(2, GenerationRequest(generator.encode("sampled", 20), 20, temperature=1.5, top_p=0.9))
    results = generator.generate_batch(requests)
    assert len({len(request.input_ids) for request in requests}) > 3  # real padding
    for request, result in zip(requests, results):
        if request.temperature > 0:
            continue
        assert batch_ids[id(request)] == solo_greedy_ids(generator, request.input_ids, request.max_new_tokens)
        assert result.new_tokens == len(batch_ids[id(request)]) <= request.max_new_tokens
        assert result.finish_reason in (STOP, LENGTH)
        alone = generator.generate_batch([GenerationRequest(request.input_ids, request.max_new_tokens)])[0]
        assert (alone.text, alone.logit_max) == (result.text, pytest.approx(result.logit_max, rel=1e-5))


def test_stop_strings_and_a_cancelled_row_leave_the_others_untouched(generator, batch_ids):
    first = generator.generate_batch([GenerationRequest(generator.encode(PROMPTS[0], 30), 30)])[0].text
    stop = first[5:7]
    stopped = GenerationRequest(generator.encode(PROMPTS[0], 30), 30, stop=(stop,))
    cancelled = GenerationRequest(generator.encode(PROMPTS[1], 30), 30)
    cancelled.cancelled.set()
    plain = GenerationRequest(generator.encode(PROMPTS[2], 40), 40)
    results = generator.generate_batch([stopped, cancelled, plain])
    assert results[0].text == first[:first.find(stop)] and results[0].finish_reason == STOP
    assert results[1].finish_reason == CANCELLED and results[1].new_tokens == 0
    assert batch_ids[id(plain)] == solo_greedy_ids(generator, plain.input_ids, 40)


def test_concurrent_requests_share_batches_and_get_their_solo_answers(generator, tmp_path, monkeypatch):
    sizes = []
    generate_batch = generator.generate_batch

    def counting(requests):
        sizes.append(len(requests))
        return generate_batch(requests)

    monkeypatch.setattr(generator, "generate_batch", counting)
    prompts = [f"What is {n} + {2 * n}?" for n in range(10)]
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(generator, audit, max_batch=4)) as url:
        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                return await asyncio.gather(*(http.post("/think", json={"prompt": p, "max_new_tokens": 16,
                                                                        "temperature": 0}) for p in prompts))

        responses = asyncio.run(burst())
    audit.close()
    assert max(sizes) > 1 and max(sizes) <= 4 and sum(sizes) == len(prompts)
    monkeypatch.undo()
    for prompt, response in zip(prompts, responses):
        assert response.status_code == 200
        assert response.json()["thinking_sha256"] is not None
        assert response.json()["answer"] == generator.generate(prompt, 16, 0.0, 1.0).text.strip()
    assert verify(tmp_path / "audit.db", audit).ok


def wait_for_rows(path, outcome: str, count: int, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = [row for row in read_rows(path) if row.outcome == outcome]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {outcome} rows after {timeout_s} s")


def test_a_client_that_goes_away_cancels_its_generation(generator, tmp_path, monkeypatch):
    finished = []
    generate_batch = generator.generate_batch

    def recording(requests):
        results = generate_batch(requests)
        finished.extend(results)
        return results

    monkeypatch.setattr(generator, "generate_batch", recording)
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(generator, audit)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/think", json={"prompt": "long", "max_new_tokens": 480, "temperature": 0}, timeout=0.5)
        [row] = wait_for_rows(tmp_path / "audit.db", "cancelled", 1)
        assert row.status == 499 and row.answer_hmac is None
        streamed = threading.Event()
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
                "model": generator.name, "messages": [{"role": "user", "content": "long"}],
                "max_tokens": 480, "temperature": 0, "stream": True}) as response:
            for _ in response.iter_lines():
                streamed.set()
                break  # the first event, then hang up
        assert streamed.is_set()
        wait_for_rows(tmp_path / "audit.db", "cancelled", 2)
        assert httpx.get(f"{url}/health").json()["queue_depth"] == 0
    audit.close()
    assert [result.finish_reason for result in finished] == [CANCELLED, CANCELLED]
    assert all(result.new_tokens < 480 for result in finished)
    assert [row.status for row in read_rows(tmp_path / "audit.db")] == [499, 499]


def test_logit_statistics_equal_the_stored_logits_ones_and_rows_retain_nothing_vocab_sized(generator, monkeypatch):
    from so8t.serve import generation
    from so8t_kernels import logit_stats

    steps, shapes, retained = [], [], []
    choose, forward, result = generation.next_tokens, generator.model.forward, generation.TextGenerator._result

    def recording_choose(logits, *args):
        steps.append(logits.detach().clone())
        return choose(logits, *args)

    def recording_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        shapes.append(tuple(output.logits.shape))
        return output

    def inspecting_result(self, row, gates):
        tensors = [value for value in vars(row).values() if isinstance(value, torch.Tensor)]
        tensors += [item for value in vars(row).values() if isinstance(value, list) for item in value
                    if isinstance(item, torch.Tensor)]
        stats = getattr(row, "stats", None)
        tensors += [value for value in getattr(stats, "__dict__", {}).values() if isinstance(value, torch.Tensor)]
        retained.append(tensors)
        return result(self, row, gates)

    monkeypatch.setattr(generation, "next_tokens", recording_choose)
    monkeypatch.setattr(generator.model, "forward", recording_forward)
    monkeypatch.setattr(generation.TextGenerator, "_result", inspecting_result)
    got = generator.generate_batch([GenerationRequest(generator.encode(PROMPTS[2], 24), 24)])[0]
    assert got.new_tokens == len(steps) > 5
    expected = logit_stats(torch.stack(steps)).tolist()
    stats = [got.logit_mean, got.logit_std, got.logit_min, got.logit_max, got.logit_nonfinite]
    assert stats == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert retained == [[]]  # nothing per step, nothing vocab-sized, kept per row
    assert shapes[0][1] == 1  # the prefill computed only the last position's logits

    poisoned = torch.tensor([[1.0, float("nan"), 3.0, float("inf")], [float("nan")] * 4])
    running = [generation.RunningLogitStats(), generation.RunningLogitStats()]
    for partial, row in zip(generation.step_partials(poisoned).tolist(), running):
        row.add(partial)
        row.add(partial)
    assert running[0].result() == pytest.approx(logit_stats(torch.stack([poisoned[0], poisoned[0]])).tolist())
    assert all(math.isnan(value) for value in running[1].result()[:4]) and running[1].result()[4] == 8


def test_streamed_text_never_shows_the_start_of_a_multi_token_stop_string(generator):
    from so8t.serve.openai_api import AnswerStream
    from so8t.serve.thinking import parse_thinking

    prompt = generator.encode(PROMPTS[2], 30)
    raw = generator.generate_batch([GenerationRequest(prompt, 30)])[0].text
    stop = raw[6:16]
    assert len(generator.tokenizer(stop, add_special_tokens=False)["input_ids"]) >= 3  # spans several tokens
    texts = []
    result = generator.generate_batch([GenerationRequest(prompt, 30, stop=(stop,), on_text=texts.append)])[0]
    assert result.finish_reason == STOP and result.text == raw[:raw.find(stop)]
    assert len(texts) > 3 and all(result.text.startswith(text) for text in texts)
    answer = AnswerStream()
    deltas = [answer.feed(f"<think>x</think>{text}") for text in texts]
    deltas.append(answer.finish(f"<think>x</think>{result.text}"))
    assert "".join(deltas) == parse_thinking(f"<think>x</think>{result.text}").answer == result.text
