"""Temperature scaling of the judge: the fitted T minimises held-out NLL (checked against a grid), keeps
every prediction, lowers the calibration error of an overconfident model; the judge applies the T that
so8t train wrote next to it, and a bad calibration file is one clear error."""

import math

import pytest
import torch
from test_judge import classifier

from so8t import SO8TError
from so8t.judge.judge import LABELS, SafetyJudge, encode_for_judge
from so8t.judge.calibration import CALIBRATION_FILE, fit_temperature, read_temperature, write_calibration
from so8t.models.demo import build_demo_tokenizer


def _overconfident(rows: int, true_temperature: float, seed: int):
    """Logits whose labels are drawn from softmax(logits / true_temperature): T = true_temperature fits."""
    generator = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(rows, len(LABELS), generator=generator, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=-1), 1, generator=generator).squeeze(1)
    return logits, labels


def test_the_fitted_temperature_minimises_held_out_nll():
    logits, labels = _overconfident(4000, true_temperature=3.0, seed=0)
    calibration = fit_temperature(logits, labels)
    grid = torch.exp(torch.linspace(math.log(0.05), math.log(50.0), 2001, dtype=torch.float64))
    grid_nll = [torch.nn.functional.cross_entropy(logits / t, labels).item() for t in grid]
    best = grid[min(range(len(grid)), key=grid_nll.__getitem__)].item()
    assert calibration.nll_after <= min(grid_nll) + 1e-9
    assert calibration.temperature == pytest.approx(best, rel=0.01)
    assert calibration.temperature == pytest.approx(3.0, rel=0.1)  # the temperature the labels came from
    assert calibration.nll_after < calibration.nll_before and calibration.ece_after < calibration.ece_before


def test_calibration_keeps_every_prediction_and_counts_accuracy():
    logits, labels = _overconfident(500, true_temperature=5.0, seed=1)
    calibration = fit_temperature(logits, labels)
    scaled = logits / calibration.temperature
    assert torch.equal(scaled.argmax(dim=-1), logits.argmax(dim=-1))
    assert calibration.held_out_rows == 500
    assert calibration.held_out_accuracy == (logits.argmax(dim=-1) == labels).double().mean().item()


def test_an_underconfident_model_gets_a_temperature_below_one():
    logits, labels = _overconfident(2000, true_temperature=0.25, seed=2)
    assert fit_temperature(logits, labels).temperature < 0.5


def test_non_finite_logits_are_refused():
    logits, labels = _overconfident(10, true_temperature=1.0, seed=3)
    logits[3, 1] = float("nan")
    with pytest.raises(SO8TError, match="not finite"):
        fit_temperature(logits, labels)


def test_the_judge_divides_its_logits_by_the_temperature():
    tokenizer = build_demo_tokenizer()
    model = classifier(tokenizer)
    with torch.no_grad():
        model.score.weight.mul_(20)  # an untrained head is unsure; make its logits spread
    prompt = "Recommend a good book."
    ids, _ = encode_for_judge(tokenizer, prompt, 512)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids])).logits[0].float()
    for temperature in (0.5, 1.0, 4.0):
        verdict = SafetyJudge(model, tokenizer, threshold=0.0, temperature=temperature).judge(prompt)
        expected = torch.softmax(logits / temperature, dim=-1)
        assert verdict.predicted == LABELS[expected.argmax()]
        assert verdict.confidence == pytest.approx(expected.max().item(), rel=1e-5)
    assert 1 / 3 + 0.05 < torch.softmax(logits, dim=-1).max() < 0.99  # the three temperatures give three answers
    very_hot = SafetyJudge(model, tokenizer, threshold=0.6, temperature=1e6).judge(prompt)
    assert very_hot.confidence == pytest.approx(1 / 3, abs=1e-4) and very_hot.reason == "low_confidence"


def test_load_reads_the_temperature_written_next_to_the_judge(tmp_path):
    tokenizer = build_demo_tokenizer()
    classifier(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert SafetyJudge.load(tmp_path).temperature == 1.0  # no calibration file: the raw softmax
    logits, labels = _overconfident(50, true_temperature=2.0, seed=4)
    calibration = fit_temperature(logits, labels)
    write_calibration(calibration, tmp_path)
    assert SafetyJudge.load(tmp_path).temperature == calibration.temperature


@pytest.mark.parametrize("content", ['{"temperature": -1}', '{"temperature": NaN}', '{"temp": 2}', "not json",
                                     '{"temperature": "2"}', "[2]"])
def test_a_bad_calibration_file_is_one_clear_error(tmp_path, content):
    (tmp_path / CALIBRATION_FILE).write_text(content)
    with pytest.raises(SO8TError, match=CALIBRATION_FILE):
        read_temperature(tmp_path)
