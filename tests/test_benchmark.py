import pytest

from kamal_attr.benchmark import EPOCHS, TRAIN_IMAGES, VAL_IMAGES, cost_split, protocol_hours


def test_protocol_extrapolation_counts_every_net_epoch_and_image():
    rates = {"source net": 1000.0, "stage 1": 500.0, "stage 2": 250.0}
    total, parts = protocol_hours(rates, loader=10_000.0)
    per_net = EPOCHS * (TRAIN_IMAGES + VAL_IMAGES / 3) / 3600
    assert parts == pytest.approx({"source nets": 22 * per_net / 1000,
                                   "component nets": 10 * per_net / 500,
                                   "target nets": 3 * per_net / 250})
    assert total == pytest.approx(sum(parts.values()))
    slow_loader, _ = protocol_hours(rates, loader=100.0)  # data loading included: the slower wins
    assert slow_loader == pytest.approx(35 * per_net / 100)


def test_cost_split_in_plain_steps():
    """A stage step at half the plain step's rate costs 2 plain steps: 1 for the student,
    then the teachers' forward (what the logits-only step adds) and the feature loss (the
    rest); target 4's 0.65 allows 1/0.65 - 1 = 0.54 beyond the student's own step."""
    steps = {"stage 1 ratio": 0.5, "stage 1, logits only ratio": 0.8, "stage 1 teachers": 3}
    assert cost_split(steps, "stage 1", 0.65) == (
        "stage 1 step = 1 + 0.25 (3 source nets' forward, logit loss) + 0.75 (feature loss) "
        "plain steps; target 4 allows 1 + 0.54")
