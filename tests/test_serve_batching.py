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
from serve_helpers import (  # noqa: F401 (one_torch_thread: autouse)
    complete,
    decode_together,
    one_torch_thread,
    open_audit,
    request,
    running_server,
    verify,
)

from so8t.audit.log import read_rows
from so8t.serve.app import create_app
from so8t.serve.engines.base import CANCELLED, LENGTH, STOP
from so8t.serve.engines.hf import HFEngine
from so8t.serve.engines.hf_batch import Row
from so8t.serve.thinking import parse_thinking

PROMPTS = ["What is 16 + 25?", "hi", "Tell me a long story about a dragon and a knight in a castle far away.",
           "2+2", "Recommend a good book about the sea."]
MAX_NEW = [30, 12, 40, 5, 25]


@pytest.fixture(scope="module")
def engine():
    engine = HFEngine.load()
    yield engine
    engine.shutdown()


def solo_greedy_ids(engine, ids: list[int], max_new_tokens: int) -> list[int]:
    """The oracle: Hugging Face's generate on the prompt alone, no padding."""
    input_ids = torch.tensor([ids])
    output = engine.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=engine.tokenizer.pad_token_id)
    return output[0, len(ids):].tolist()


@pytest.fixture
def batch_ids(engine, monkeypatch):
    """Records each finished row's generated ids (EOS included), by request id."""
    recorded, complete_row = {}, engine.decoder._complete

    def recording(row):
        recorded[row.request.request_id] = list(row.ids)
        return complete_row(row)

    monkeypatch.setattr(engine.decoder, "_complete", recording)
    return recorded


def test_a_padded_batch_decodes_each_row_as_generate_does_alone(engine, batch_ids):
    requests = [request(engine, prompt, limit) for prompt, limit in zip(PROMPTS, MAX_NEW)]
    requests.insert(2, request(engine, "sampled", 20, temperature=1.5, top_p=0.9))
    results, _ = decode_together(engine, requests)
    assert len({len(each.prompt.ids) for each in requests}) > 3  # real padding
    for each, result in zip(requests, results):
        if not each.sampling.greedy:
            continue
        ids = batch_ids[each.request_id]
        assert ids == solo_greedy_ids(engine, each.prompt.ids, each.sampling.max_new_tokens)
        assert result.new_tokens == len(ids) <= each.sampling.max_new_tokens
        assert result.finish_reason in (STOP, LENGTH)
        [alone], _ = decode_together(engine, [each])
        assert (alone.text, alone.logit_stats.max) == (result.text, pytest.approx(result.logit_stats.max, rel=1e-5))


def test_stop_strings_and_a_cancelled_row_leave_the_others_untouched(engine, batch_ids):
    first = complete(engine, PROMPTS[0], 30).text
    stop = first[5:7]
    stopped = request(engine, PROMPTS[0], 30, stop=(stop,))
    cancelled, plain = request(engine, PROMPTS[1], 30), request(engine, PROMPTS[2], 40)
    events = [[], [], []]
    rows = [Row(each, events[index].append, False) for index, each in enumerate((stopped, cancelled, plain))]
    rows[1].cancelled.set()
    engine.decoder.run(rows)
    [stopped_result], [cancelled_result], [plain_result] = events
    assert stopped_result.text == first[:first.find(stop)] and stopped_result.finish_reason == STOP
    assert cancelled_result.finish_reason == CANCELLED and cancelled_result.new_tokens == 0
    assert cancelled_result.logit_stats is None
    assert batch_ids[plain.request_id] == solo_greedy_ids(engine, plain.prompt.ids, 40)
    assert plain_result.new_tokens == len(batch_ids[plain.request_id])


def test_concurrent_requests_share_batches_and_get_their_solo_answers(tmp_path, monkeypatch):
    engine = HFEngine.load(max_batch=4)
    sizes = []
    run = engine.decoder.run

    def counting(rows):
        sizes.append(len(rows))
        return run(rows)

    monkeypatch.setattr(engine.decoder, "run", counting)
    prompts = [f"What is {n} + {2 * n}?" for n in range(10)]
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(engine, audit)) as url:
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
        assert response.json()["answer"] == parse_thinking(complete(engine, prompt, 16).text).answer
    engine.shutdown()
    assert verify(tmp_path / "audit.db", audit).ok


def wait_for_rows(path, outcome: str, count: int, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = [row for row in read_rows(path) if row.outcome == outcome]
        if len(rows) >= count:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {outcome} rows after {timeout_s} s")


def test_a_client_that_goes_away_cancels_its_generation(engine, tmp_path, monkeypatch):
    finished = []
    complete_row = engine.decoder._complete

    def recording(row):
        finished.append(row)
        return complete_row(row)

    monkeypatch.setattr(engine.decoder, "_complete", recording)
    audit = open_audit(tmp_path / "audit.db")
    with running_server(create_app(engine, audit)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/think", json={"prompt": "long", "max_new_tokens": 480, "temperature": 0}, timeout=0.5)
        [row] = wait_for_rows(tmp_path / "audit.db", "cancelled", 1)
        assert row.status == 499 and row.answer_hmac is None
        streamed = threading.Event()
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
                "model": engine.name, "messages": [{"role": "user", "content": "long"}],
                "max_tokens": 480, "temperature": 0, "stream": True}) as response:
            for _ in response.iter_lines():
                streamed.set()
                break  # the first event, then hang up
        assert streamed.is_set()
        wait_for_rows(tmp_path / "audit.db", "cancelled", 2)
        assert httpx.get(f"{url}/health").json()["queue_depth"] == 0
    audit.close()
    assert [row.finish_reason for row in finished] == [CANCELLED, CANCELLED]
    assert all(len(row.ids) < 480 for row in finished)
    assert [row.status for row in read_rows(tmp_path / "audit.db")] == [499, 499]


def test_logit_statistics_equal_the_stored_logits_ones_and_rows_retain_nothing_vocab_sized(engine, monkeypatch):
    from so8t.serve.engines import hf_batch
    from so8t_kernels import logit_stats

    steps, shapes, retained = [], [], []
    choose, forward, complete_row = hf_batch.next_tokens, engine.model.forward, engine.decoder._complete

    def recording_choose(logits, *args):
        steps.append(logits.detach().clone())
        return choose(logits, *args)

    def recording_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        shapes.append(tuple(output.logits.shape))
        return output

    def inspecting_complete(row):
        tensors = [value for value in vars(row).values() if isinstance(value, torch.Tensor)]
        tensors += [item for value in vars(row).values() if isinstance(value, list) for item in value
                    if isinstance(item, torch.Tensor)]
        retained.append(tensors)
        assert all(len(partial) == 6 for partial in row.partials)  # six numbers a step, whatever the vocabulary
        return complete_row(row)

    monkeypatch.setattr(hf_batch, "next_tokens", recording_choose)
    monkeypatch.setattr(engine.model, "forward", recording_forward)
    monkeypatch.setattr(engine.decoder, "_complete", inspecting_complete)
    [got], _ = decode_together(engine, [request(engine, PROMPTS[2], 24)])
    assert got.new_tokens == len(steps) > 5
    expected = logit_stats(torch.stack(steps)).tolist()
    stats = got.logit_stats
    assert [stats.mean, stats.std, stats.min, stats.max, stats.nonfinite] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert retained == [[]]  # nothing vocab-sized kept per row
    assert shapes[0][1] == 1  # the prefill computed only the last position's logits

    from so8t_kernels.logit_stats import merge_partials

    poisoned = torch.tensor([[1.0, float("nan"), 3.0, float("inf")], [float("nan")] * 4])
    partials = hf_batch.step_partials(poisoned)
    twice = merge_partials(torch.stack([partials[0], partials[0]]))
    assert twice.tolist() == pytest.approx(logit_stats(torch.stack([poisoned[0], poisoned[0]])).tolist())
    none_finite = merge_partials(torch.stack([partials[1], partials[1]])).tolist()
    assert all(math.isnan(value) for value in none_finite[:4]) and none_finite[4] == 8


def test_streamed_text_never_shows_the_start_of_a_multi_token_stop_string(engine):
    # Sampled (seeded twice alike): the demo model's greedy text is one character repeated.
    torch.manual_seed(0)
    raw = complete(engine, PROMPTS[2], 30, temperature=1.0).text
    stop = raw[6:16]
    assert len(engine.tokenizer(stop, add_special_tokens=False)["input_ids"]) >= 3  # spans several tokens
    torch.manual_seed(0)
    [result], [deltas] = decode_together(engine, [request(engine, PROMPTS[2], 30, 1.0, stop=(stop,))], deltas=True)
    assert result.finish_reason == STOP and result.text == raw[:raw.find(stop)]
    assert len(deltas) > 3 and "".join(deltas) == result.text
    sent = ""
    for delta in deltas[:-1]:
        sent += delta
        assert not any(sent.endswith(stop[:length]) for length in range(1, len(stop)))  # no tail of the stop
