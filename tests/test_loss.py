"""loss.py: focal, label smoothing, age smoothing, age_sigma, soft F1, class weights and the Criterion."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import default_config
from dataset import NUM_CLASSES, decode_class, encode_class
from loss import (Criterion, age_band_distribution, focal_loss, frequency_weights, head_probabilities, soft_f1_loss,
                  soft_targets)


def loss_cfg(**overrides):
    cfg = default_config("train")
    cfg.update(head="multi", criterion="cross_entropy", focal_gamma=2.0, label_smoothing=0.1, age_smoothing=0.0,
               class_weights=False, f1_weight=0.0, mask_weight=1.0, gender_weight=1.0, age_weight=1.0,
               age_regression=0.0)
    cfg.update(overrides)
    return cfg


def batch(n=12, seed=0, head="multi"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    ages = torch.randint(18, 80, (n,), generator=g).float()
    if head == "single":
        outputs = {"logits": torch.randn(n, NUM_CLASSES, generator=g)}
    else:
        outputs = {t: torch.randn(n, k, generator=g) for t, k in (("mask", 3), ("gender", 2), ("age", 3))}
    outputs["age_value"] = torch.rand(n, generator=g)
    return outputs, labels, ages


# ---------------------------------------------------------------------------------------------
# Focal and label smoothing
@pytest.mark.parametrize("n_classes", [2, 3, NUM_CLASSES])
def test_focal_with_gamma_0_is_cross_entropy(n_classes):
    g = torch.Generator().manual_seed(n_classes)
    logits, target = torch.randn(10, n_classes, generator=g), torch.randint(n_classes, (10,), generator=g)
    loss = focal_loss(logits, soft_targets(target, n_classes), gamma=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))


def test_focal_with_gamma_matches_the_formula_and_down_weights_easy_examples():
    g = torch.Generator().manual_seed(1)
    logits, target = 2 * torch.randn(10, 5, generator=g), torch.randint(5, (10,), generator=g)
    p = logits.softmax(1)[torch.arange(10), target]
    expected = (-(1 - p) ** 2 * p.log()).mean()
    loss = focal_loss(logits, soft_targets(target, 5), gamma=2.0)
    torch.testing.assert_close(loss, expected)
    assert loss < F.cross_entropy(logits, target)


def test_focal_class_weights_scale_each_class():
    g = torch.Generator().manual_seed(2)
    logits, target = torch.randn(8, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    weight = torch.tensor([0.5, 2.0, 1.0])
    per_sample = F.cross_entropy(logits, target, reduction="none") * weight[target]
    torch.testing.assert_close(focal_loss(logits, soft_targets(target, 3), 0.0, weight), per_sample.mean())


def test_soft_targets_plain_is_one_hot():
    target = torch.tensor([0, 5, 17])
    torch.testing.assert_close(soft_targets(target, NUM_CLASSES), F.one_hot(target, NUM_CLASSES).float())


def test_label_smoothing_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(9, NUM_CLASSES, generator=g), torch.randint(NUM_CLASSES, (9,), generator=g)
    criterion = Criterion(loss_cfg(head="single", criterion="label_smoothing", label_smoothing=0.0))
    torch.testing.assert_close(criterion.head_loss("logits", logits, target, ages=None),
                               F.cross_entropy(logits, target))


@pytest.mark.parametrize("s", [0.1, 0.3])
@pytest.mark.parametrize("n_classes", [3, NUM_CLASSES])
def test_label_smoothing_spreads_over_the_other_classes(s, n_classes):
    g = torch.Generator().manual_seed(4)
    logits, target = torch.randn(7, n_classes, generator=g), torch.randint(n_classes, (7,), generator=g)
    dist = soft_targets(target, n_classes, smoothing=s)
    # hand computation: 1 - s on the true class, s / (C - 1) on each of the others
    for i, t in enumerate(target.tolist()):
        for c in range(n_classes):
            assert math.isclose(float(dist[i, c]), 1 - s if c == t else s / (n_classes - 1), rel_tol=1e-6)
    log_p = logits.log_softmax(1)
    by_hand = -((1 - s) * log_p[torch.arange(7), target]
                + s / (n_classes - 1) * (log_p.sum(1) - log_p[torch.arange(7), target])).mean()
    head = "logits" if n_classes == NUM_CLASSES else "age"
    criterion = Criterion(loss_cfg(head="single" if head == "logits" else "multi", criterion="label_smoothing",
                                   label_smoothing=s))
    loss = criterion.head_loss(head, logits, target, ages=None)
    torch.testing.assert_close(loss, by_hand)
    # torch spreads its eps over all C classes: eps = s * C / (C - 1) gives the same targets
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, label_smoothing=s * n_classes / (n_classes - 1)))
    assert not torch.allclose(loss, F.cross_entropy(logits, target, label_smoothing=s))


# ---------------------------------------------------------------------------------------------
# Age smoothing
def test_age_smoothing_18_classes_only_moves_mass_to_adjacent_bands():
    a = 0.2
    target = torch.arange(NUM_CLASSES)
    dist = soft_targets(target, NUM_CLASSES, age_smoothing=a, age_band_of=torch.arange(NUM_CLASSES) % 3)
    torch.testing.assert_close(dist.sum(1), torch.ones(NUM_CLASSES))
    mask, gender, band = decode_class(np.arange(NUM_CLASSES))
    for t in range(NUM_CLASSES):
        neighbours = [c for c in range(NUM_CLASSES)
                      if mask[c] == mask[t] and gender[c] == gender[t] and abs(int(band[c]) - int(band[t])) == 1]
        assert len(neighbours) == (2 if band[t] == 1 else 1)
        assert math.isclose(float(dist[t, t]), 1 - a, rel_tol=1e-6)
        for c in range(NUM_CLASSES):
            if c in neighbours:
                assert math.isclose(float(dist[t, c]), a / len(neighbours), rel_tol=1e-6), (t, c)
            elif c != t:
                assert dist[t, c] == 0, (t, c)


def test_age_smoothing_does_not_cross_gender_or_mask_boundaries():
    # class 2 (band 2) and class 3 (band 0) are next to each other but differ in gender
    dist = soft_targets(torch.tensor([2, 3, 5, 6]), NUM_CLASSES, age_smoothing=0.3,
                        age_band_of=torch.arange(NUM_CLASSES) % 3)
    assert dist[0, 3] == 0 and dist[1, 2] == 0 and dist[2, 6] == 0 and dist[3, 5] == 0
    assert dist[0, 1] > 0 and dist[1, 4] > 0


def test_age_smoothing_three_class_age_head():
    a = 0.4
    dist = soft_targets(torch.tensor([0, 1, 2]), 3, age_smoothing=a, age_band_of=torch.arange(3))
    expected = torch.tensor([[1 - a, a, 0.0], [a / 2, 1 - a, a / 2], [0.0, a, 1 - a]])
    torch.testing.assert_close(dist, expected)


def test_age_smoothing_in_the_criterion_only_changes_the_age_head():
    outputs, labels, ages = batch()
    _, plain = Criterion(loss_cfg())(outputs, labels, ages)
    _, smoothed = Criterion(loss_cfg(age_smoothing=0.2))(outputs, labels, ages)
    torch.testing.assert_close(plain["mask"], smoothed["mask"])
    torch.testing.assert_close(plain["gender"], smoothed["gender"])
    assert not torch.allclose(plain["age"], smoothed["age"])
    band = decode_class(labels)[2]
    dist = soft_targets(band, 3, age_smoothing=0.2, age_band_of=torch.arange(3))
    expected = -(dist * outputs["age"].log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(smoothed["age"], expected)


def test_age_smoothing_without_bands_is_ignored():
    target = torch.tensor([0, 1])
    torch.testing.assert_close(soft_targets(target, 2, age_smoothing=0.3), F.one_hot(target, 2).float())


# ---------------------------------------------------------------------------------------------
# Age-band targets spread by age (age_sigma)
def test_age_band_distribution_near_and_far_from_the_edges():
    dist = age_band_distribution(torch.tensor([20, 29, 30, 45, 57, 58, 80]), age_threshold=58, sigma=3.0)
    torch.testing.assert_close(dist.sum(1), torch.ones(7))
    assert dist[0, 0] > 0.999 and dist[3, 1] > 0.99 and dist[6, 2] > 0.999
    # the two ages next to an edge mirror each other: 29 is 0.57 <30, 30 is 0.57 30-59
    assert math.isclose(float(dist[1, 0]), 0.5662, abs_tol=1e-3)
    assert math.isclose(float(dist[2, 1]), 0.5662, abs_tol=1e-3)
    assert math.isclose(float(dist[1, 1]), float(dist[2, 0]), abs_tol=1e-6)
    assert dist[4, 1] > 0.5 > dist[4, 2] > 0.4 and dist[5, 2] > 0.5  # the edge follows age_threshold


def test_age_sigma_spreads_the_18_class_target_over_its_age_bands_only():
    labels = torch.tensor([encode_class(1, 1, 0), encode_class(2, 0, 1)])
    band_dist = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.7, 0.2]])
    dist = soft_targets(labels, NUM_CLASSES, age_band_of=torch.arange(NUM_CLASSES) % 3, band_dist=band_dist)
    expected = torch.zeros(2, NUM_CLASSES)
    expected[0, encode_class(1, 1, 0):encode_class(1, 1, 0) + 3] = band_dist[0]
    expected[1, encode_class(2, 0, 0):encode_class(2, 0, 0) + 3] = band_dist[1]
    torch.testing.assert_close(dist, expected)


@pytest.mark.parametrize("head", ["multi", "single"])
def test_age_sigma_in_the_criterion_uses_the_ages(head):
    outputs, labels, ages = batch(head=head)
    cfg = loss_cfg(head=head, age_sigma=3.0, age_threshold=60)
    _, spread = Criterion(cfg)(outputs, labels, ages)
    name = "age" if head == "multi" else "logits"
    target = decode_class(labels)[2] if head == "multi" else labels
    band_of = torch.arange(3 if head == "multi" else NUM_CLASSES) % 3
    dist = soft_targets(target, len(band_of), age_band_of=band_of, band_dist=age_band_distribution(ages, 60, 3.0))
    torch.testing.assert_close(spread[name], -(dist * outputs[name].log_softmax(1)).sum(1).mean())
    if head == "multi":
        _, plain = Criterion(loss_cfg())(outputs, labels, ages)
        torch.testing.assert_close(plain["gender"], spread["gender"])


def test_images_with_unknown_age_keep_one_hot_bands_and_skip_the_regression():
    outputs, labels, ages = batch()
    unknown = ages.clone()
    unknown[:4] = float("nan")
    cfg = loss_cfg(age_sigma=5.0, age_threshold=58, age_regression=0.1)
    _, parts = Criterion(cfg)(outputs, labels, unknown)
    band = decode_class(labels)[2]
    dist = age_band_distribution(ages, 58, 5.0)
    dist[:4] = F.one_hot(band[:4], 3).float()
    torch.testing.assert_close(parts["age"], -(dist * outputs["age"].log_softmax(1)).sum(1).mean())
    torch.testing.assert_close(parts["age_value"], F.mse_loss(outputs["age_value"][4:], ages[4:] / 100))
    _, none_known = Criterion(cfg)(outputs, labels, torch.full_like(ages, float("nan")))
    assert none_known["age_value"] == 0 and torch.isfinite(none_known["age"])
    age_value = outputs["age_value"].clone().requires_grad_()
    total, _ = Criterion(cfg)({**outputs, "age_value": age_value}, labels, unknown)
    total.backward()
    assert (age_value.grad[:4] == 0).all() and (age_value.grad[4:] != 0).all()


# ---------------------------------------------------------------------------------------------
# Class probabilities as targets (soft pseudo-labels)
def test_head_probabilities_sum_the_classes_of_each_task():
    one_hot = F.one_hot(torch.arange(NUM_CLASSES), NUM_CLASSES).float()
    mask, gender, band = decode_class(torch.arange(NUM_CLASSES))
    for head, task, n in (("mask", mask, 3), ("gender", gender, 2), ("age", band, 3)):
        torch.testing.assert_close(head_probabilities(one_hot, head), F.one_hot(task, n).float())
    probs = torch.rand(5, NUM_CLASSES).softmax(1)
    torch.testing.assert_close(head_probabilities(probs, "gender")[:, 1], probs[:, [3, 4, 5, 9, 10, 11, 15, 16, 17]].sum(1))
    assert head_probabilities(probs, "logits") is probs


@pytest.mark.parametrize("head", ["multi", "single"])
def test_rows_with_class_probabilities_train_towards_them(head):
    """Rows with probabilities use them as every head's target (no smoothing, no age spread);
    NaN rows keep their usual targets; the age regression still skips NaN ages."""
    outputs, labels, ages = batch(head=head)
    cfg = loss_cfg(head=head, criterion="label_smoothing", label_smoothing=0.1, age_sigma=5.0, age_regression=0.1)
    g = torch.Generator().manual_seed(1)
    soft = torch.full((len(labels), NUM_CLASSES), float("nan"))
    soft[:4] = torch.rand(4, NUM_CLASSES, generator=g).softmax(1)
    ages = ages.clone()
    ages[:4] = float("nan")
    _, hard_parts = Criterion(cfg)(outputs, labels, ages)
    _, parts = Criterion(cfg)(outputs, labels, ages, soft)
    _, all_nan = Criterion(cfg)(outputs, labels, ages, torch.full_like(soft, float("nan")))
    for name in outputs:
        torch.testing.assert_close(all_nan[name], hard_parts[name])
        if name == "age_value":
            torch.testing.assert_close(parts[name], hard_parts[name])
            continue
        log_p = outputs[name].log_softmax(1)
        soft_ce = -(head_probabilities(soft[:4], name) * log_p[:4]).sum(1)
        # each hard row's share of the mean is unchanged, so the difference is the soft rows' own
        hard_rows = Criterion(cfg)({k: v[:4] for k, v in outputs.items()}, labels[:4], ages[:4])[1][name]
        torch.testing.assert_close(parts[name] - hard_parts[name], (soft_ce.mean() - hard_rows) * 4 / len(labels))


# ---------------------------------------------------------------------------------------------
# Soft F1 and class weights
def test_soft_f1_loss_perfect_and_wrong():
    target = torch.arange(NUM_CLASSES).repeat(2)
    perfect = 50.0 * F.one_hot(target, NUM_CLASSES).float()
    wrong = 50.0 * F.one_hot((target + 1) % NUM_CLASSES, NUM_CLASSES).float()
    assert float(soft_f1_loss(perfect, target, NUM_CLASSES)) < 1e-4
    assert float(soft_f1_loss(wrong, target, NUM_CLASSES)) > 1 - 1e-4
    uniform = torch.zeros(len(target), NUM_CLASSES)
    assert 0.5 < float(soft_f1_loss(uniform, target, NUM_CLASSES)) < 1.0


def test_soft_f1_loss_is_differentiable():
    logits = torch.randn(6, 3, requires_grad=True)
    soft_f1_loss(logits, torch.tensor([0, 1, 2, 0, 1, 2]), 3).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_frequency_weights_are_one_minus_frequency():
    labels = np.array([0, 0, 0, 1, 2, 2, 0, 1])
    torch.testing.assert_close(frequency_weights(labels, 4), torch.tensor([1 - 4 / 8, 1 - 2 / 8, 1 - 2 / 8, 1.0]))


# ---------------------------------------------------------------------------------------------
# Criterion
def test_criterion_single_head():
    outputs, labels, ages = batch(head="single")
    del outputs["age_value"]
    total, parts = Criterion(loss_cfg(head="single"))(outputs, labels, ages)
    assert set(parts) == {"logits"}
    torch.testing.assert_close(total, F.cross_entropy(outputs["logits"], labels))
    torch.testing.assert_close(parts["logits"], total.detach())


def test_criterion_single_head_with_age_regression():
    outputs, labels, ages = batch(head="single")
    total, parts = Criterion(loss_cfg(head="single", age_regression=0.5))(outputs, labels, ages)
    assert set(parts) == {"logits", "age_value"}
    torch.testing.assert_close(parts["age_value"], F.mse_loss(outputs["age_value"], ages / 100))
    torch.testing.assert_close(total, parts["logits"] + 0.5 * parts["age_value"])


def test_criterion_multi_head_is_the_weighted_sum_of_its_parts():
    outputs, labels, ages = batch()
    cfg = loss_cfg(mask_weight=2.0, gender_weight=0.5, age_weight=3.0, age_regression=0.7)
    total, parts = Criterion(cfg)(outputs, labels, ages)
    assert set(parts) == {"mask", "gender", "age", "age_value"}
    assert all(not p.requires_grad for p in parts.values())
    mask, gender, band = decode_class(labels)
    torch.testing.assert_close(parts["mask"], F.cross_entropy(outputs["mask"], mask))
    torch.testing.assert_close(parts["gender"], F.cross_entropy(outputs["gender"], gender))
    torch.testing.assert_close(parts["age"], F.cross_entropy(outputs["age"], band))
    # bit for bit, so runs recorded before the regression was masked repeat exactly
    assert torch.equal(parts["age_value"], F.mse_loss(outputs["age_value"], ages / 100))
    torch.testing.assert_close(total, 2.0 * parts["mask"] + 0.5 * parts["gender"] + 3.0 * parts["age"]
                               + 0.7 * parts["age_value"])


def test_criterion_multi_head_without_age_regression():
    outputs, labels, ages = batch()
    del outputs["age_value"]  # a model built with age_regression 0 has no age_value output
    total, parts = Criterion(loss_cfg())(outputs, labels, ages)
    assert set(parts) == {"mask", "gender", "age"}
    torch.testing.assert_close(total, parts["mask"] + parts["gender"] + parts["age"])


def test_criterion_backpropagates():
    outputs, labels, ages = batch()
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    total, _ = Criterion(loss_cfg(age_regression=1.0, f1_weight=0.5))(outputs, labels, ages)
    total.backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in outputs.values())


def test_criterion_f1_weight_adds_the_soft_f1_loss():
    outputs, labels, ages = batch()
    _, plain = Criterion(loss_cfg())(outputs, labels, ages)
    _, with_f1 = Criterion(loss_cfg(f1_weight=0.5))(outputs, labels, ages)
    mask = decode_class(labels)[0]
    torch.testing.assert_close(with_f1["mask"], plain["mask"] + 0.5 * soft_f1_loss(outputs["mask"], mask, 3))


def test_criterion_f1_criterion():
    outputs, labels, ages = batch(head="single")
    total, parts = Criterion(loss_cfg(head="single", criterion="f1"))(outputs, labels, ages)
    torch.testing.assert_close(total, soft_f1_loss(outputs["logits"], labels, NUM_CLASSES))


@pytest.mark.parametrize("head", ["single", "multi"])
def test_class_weights_change_the_loss(head):
    outputs, labels, ages = batch(head=head)
    train_labels = np.array([0] * 30 + [7] * 5 + [17] * 2 + list(range(NUM_CLASSES)))
    plain_total, _ = Criterion(loss_cfg(head=head))(outputs, labels, ages)
    criterion = Criterion(loss_cfg(head=head, class_weights=True), train_labels)
    weighted_total, _ = criterion(outputs, labels, ages)
    assert not torch.allclose(plain_total, weighted_total)
    heads = ["logits"] if head == "single" else ["mask", "gender", "age"]
    assert set(criterion.class_weights) == set(heads)
    task_labels = dict(zip(("mask", "gender", "age"), decode_class(train_labels)), logits=train_labels)
    for h in heads:
        n = Criterion.num_classes(h)
        freq = np.bincount(task_labels[h], minlength=n) / len(train_labels)
        torch.testing.assert_close(criterion.class_weights[h], torch.tensor(1 - freq, dtype=torch.float32))
    # without training labels the option has nothing to weigh by
    unweighted, _ = Criterion(loss_cfg(head=head, class_weights=True))(outputs, labels, ages)
    torch.testing.assert_close(unweighted, plain_total)


def test_unknown_criterion_raises():
    with pytest.raises(ValueError, match="hinge"):
        Criterion(loss_cfg(criterion="hinge"))


@pytest.mark.parametrize("head", ["single", "multi"])
def test_criterion_focal_uses_the_focal_gamma(head):
    outputs, labels, ages = batch(head=head)
    del outputs["age_value"]
    total, parts = Criterion(loss_cfg(head=head, criterion="focal", focal_gamma=2.0))(outputs, labels, ages)
    plain, _ = Criterion(loss_cfg(head=head))(outputs, labels, ages)
    targets = dict(zip(("mask", "gender", "age"), decode_class(labels)), logits=labels)
    for h in parts:
        n = Criterion.num_classes(h)
        torch.testing.assert_close(parts[h], focal_loss(outputs[h], soft_targets(targets[h], n), gamma=2.0))
    assert total < plain - 1e-3  # focal down-weights: not the cross-entropy under another name
