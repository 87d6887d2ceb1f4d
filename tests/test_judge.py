"""The safety judge without a server: the fail-closed decision, encoding, data rows, label
vocabulary checks, an untrained judge escalating, and the LoRA path of ``--task classify``."""

import json

import pytest
import torch
from serve_helpers import one_torch_thread  # noqa: F401 (autouse)
from transformers import Phi3ForCausalLM, Phi3ForSequenceClassification

from so8t import SO8TError, attach_so8t, find_so8t_handle
from so8t.judge.data import read_labelled_jsonl
from so8t.judge.judge import (
    ALLOW,
    DENY,
    ESCALATE,
    LABELS,
    SafetyJudge,
    check_threshold,
    decide,
    encode_for_judge,
    label_maps,
)
from so8t.models.demo import build_demo_tokenizer, demo_model_config
from so8t.training.classify import train_classifier
from so8t.training.options import TrainOptions


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer()


def classifier(tokenizer, seed=0, labels=LABELS):
    torch.manual_seed(seed)
    config = demo_model_config(tokenizer, num_labels=len(labels), id2label=dict(enumerate(labels)),
                               label2id={label: index for index, label in enumerate(labels)})
    return Phi3ForSequenceClassification(config)


@pytest.mark.parametrize(
    ("probabilities", "threshold", "truncated", "expected"),
    [
        ([0.9, 0.05, 0.05], 0.6, False, (ALLOW, ALLOW, "model")),
        ([0.1, 0.1, 0.8], 0.6, False, (DENY, DENY, "model")),
        ([0.2, 0.7, 0.1], 0.6, False, (ESCALATE, ESCALATE, "model")),
        ([0.1, 0.3, 0.6], 0.6, False, (DENY, DENY, "model")),  # at the threshold: confident enough
        ([0.59, 0.21, 0.2], 0.6, False, (ESCALATE, ALLOW, "low_confidence")),
        ([0.3, 0.3, 0.4], 0.6, False, (ESCALATE, DENY, "low_confidence")),
        ([0.3, 0.3, 0.4], 0.0, False, (DENY, DENY, "model")),
        ([0.99, 0.0, 0.01], 0.6, True, (ESCALATE, ALLOW, "too_long")),
        ([0.98, 0.01, 0.01], 1.0, False, (ESCALATE, ALLOW, "low_confidence")),
    ],
)
def test_decide_fails_closed(probabilities, threshold, truncated, expected):
    verdict = decide(probabilities, threshold, truncated)
    assert (verdict.label, verdict.predicted, verdict.reason) == expected
    assert verdict.confidence == max(probabilities)


def test_threshold_and_probability_count_are_checked():
    assert check_threshold(0.0) == 0.0 and check_threshold(1.0) == 1.0
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(SO8TError, match="safety threshold"):
            check_threshold(bad)
    with pytest.raises(ValueError, match="3 class probabilities"):
        decide([0.5, 0.5], 0.5)


def test_encoding_ends_with_eos_and_reports_truncation(tokenizer):
    ids, truncated = encode_for_judge(tokenizer, "abc", 10)
    assert ids == tokenizer("abc")["input_ids"] + [tokenizer.eos_token_id] and not truncated
    ids, truncated = encode_for_judge(tokenizer, "x" * 50, 10)
    assert len(ids) == 10 and ids[-1] == tokenizer.eos_token_id and truncated


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "hi", "label": "BLOCK"}', "label 'BLOCK' is not one of ALLOW, ESCALATE, DENY"),
        ('{"text": "hi"}', "expected an object with a string `text` and a `label`"),
        ('{"text": 3, "label": "ALLOW"}', "expected an object with a string `text`"),
        ('{"text": "hi", "label": "ALLOW"', "malformed JSON"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine", "label": "ALLOW"}\n' + line + "\n")
    with pytest.raises(SO8TError, match=f"data.jsonl:2: .*{message[:20]}"):
        read_labelled_jsonl(path)


def test_an_untrained_judge_is_not_confident_and_escalates(tokenizer):
    model = classifier(tokenizer)
    attach_so8t(model)
    judge = SafetyJudge(model, tokenizer, threshold=0.6)
    for prompt in ("How do I bake bread?", "Explain exactly how to build a pipe bomb.", "hello"):
        verdict = judge.judge(prompt)
        assert verdict.label == ESCALATE and verdict.reason == "low_confidence"
        assert verdict.predicted in LABELS and 1 / 3 <= verdict.confidence < 0.6


def test_a_prompt_longer_than_the_judge_reads_escalates(tokenizer):
    judge = SafetyJudge(classifier(tokenizer), tokenizer, threshold=0.0)
    assert judge.judge("short").reason == "model"
    verdict = judge.judge("a" * (judge.max_length + 1))
    assert verdict.label == ESCALATE and verdict.reason == "too_long"


def test_a_model_with_other_labels_is_refused(tokenizer):
    with pytest.raises(SO8TError, match="labels are"):
        SafetyJudge(classifier(tokenizer, labels=(DENY, ESCALATE, ALLOW)), tokenizer)
    with pytest.raises(SO8TError, match="labels are"):
        SafetyJudge(classifier(tokenizer, labels=("LABEL_0", "LABEL_1", "LABEL_2")), tokenizer)


def test_lora_classifier_from_a_local_model_saves_and_loads(tokenizer, tmp_path):
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    Phi3ForCausalLM(demo_model_config(tokenizer)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    output = train_classifier(TrainOptions(model=str(base_dir), output_dir=str(tmp_path / "judge"), max_steps=3,
                                           batch_size=4, max_length=64, warmup_steps=1))
    assert (output / "adapter_config.json").is_file() and (output / "so8t" / "so8t_adapter.json").is_file()
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    assert (output / "monitoring" / "metrics.jsonl").is_file()
    judge = SafetyJudge.load(output, threshold=0.0)
    assert find_so8t_handle(judge.model) is not None
    assert judge.model.config.id2label == label_maps()[0]
    assert judge.judge("How do I plant tomatoes?").label in LABELS


@pytest.mark.parametrize("flag", ["load_in_4bit", "bf16", "gradient_checkpointing"])
def test_generate_only_options_are_refused(tmp_path, flag):
    with pytest.raises(SO8TError, match="--task classify trains in fp32"):
        train_classifier(TrainOptions(model="demo", output_dir=str(tmp_path / "judge"), **{flag: True}))
    assert not (tmp_path / "judge").exists()
