"""Losses: cross-entropy, focal, label smoothing (optionally only towards adjacent age bands),
age-band targets spread by age (age_sigma), a soft macro-F1 loss, and MSE for the age regression
output, combined per head with weights from the config; images labelled with class probabilities
(soft pseudo-labels) train towards them instead. `Criterion(outputs, labels, ages, soft)` returns
(total, {part: detached value}) for logging."""
import numpy as np
import torch
import torch.nn.functional as F

from dataset import NUM_CLASSES, decode_class
from model import task_probabilities

CRITERIA = ("cross_entropy", "focal", "label_smoothing", "f1")


def age_band_distribution(ages, age_threshold, sigma):
    """P(age band) of each age (B x 3) when a labelled age is read as Normal(age, sigma) years,
    label distribution learning for the bands: at sigma 3 a 29-year-old is 0.57 <30 and 0.43
    30-59, a 45-year-old all 30-59. Ages are whole years, so each edge sits half a year below
    its first age (30 and age_threshold)."""
    edges = torch.tensor([30.0, float(age_threshold)], device=ages.device) - 0.5
    below = torch.distributions.Normal(ages.float()[:, None], sigma, validate_args=False).cdf(edges)  # NaN age: NaN
    return torch.stack([below[:, 0], below[:, 1] - below[:, 0], 1 - below[:, 1]], 1)


def soft_targets(target, num_classes, smoothing=0.0, age_smoothing=0.0, age_band_of=None, band_dist=None):
    """Target distributions (B x C). `band_dist` (B x 3, age_band_distribution) spreads the true
    class over the classes that differ from it only in age band; `smoothing` spreads over all
    other classes; `age_smoothing` moves mass only to the classes whose age band is next to the
    true one (and which agree on everything else). age_band_of[c] is the age band of class c,
    None if the classes are not age-banded."""
    dist = F.one_hot(target, num_classes).float()
    if band_dist is not None and age_band_of is not None:
        band = age_band_of.to(target.device)
        rest = torch.arange(num_classes, device=target.device) - band  # the class without its band
        same_rest = rest[None, :] == (target - band[target])[:, None]
        dist = same_rest.float() * band_dist[:, band]
    if age_smoothing > 0 and age_band_of is not None:
        band = age_band_of.to(target.device)
        # neighbours: the classes next to the true one whose age band is one step away
        offset = torch.arange(num_classes, device=target.device)[None, :] - target[:, None]
        neighbour = (offset.abs() == 1) & (band[None, :] - band[target][:, None] == offset)
        share = neighbour.float() / neighbour.float().sum(1, keepdim=True).clamp(min=1)
        has = neighbour.any(1, keepdim=True).float()
        dist = dist * (1 - age_smoothing * has) + age_smoothing * share
    if smoothing > 0:
        dist = dist * (1 - smoothing) + (1 - dist) * smoothing / (num_classes - 1)
    return dist


def head_probabilities(class_probs, head):
    """18-class probabilities (B x 18) summed into one head's classes (B x 3, 2 or 3)."""
    return class_probs if head == "logits" else task_probabilities(class_probs)[head]


def focal_loss(logits, target_dist, gamma=2.0, weight=None):
    """Focal loss (Lin et al.) on soft targets: -sum_c w_c t_c (1 - p_c)^gamma log p_c.
    With gamma 0 and no weights it is the cross-entropy."""
    log_p = logits.float().log_softmax(1)
    per_class = -target_dist * (1 - log_p.exp()) ** gamma * log_p
    if weight is not None:
        per_class = per_class * weight[None, :]
    return per_class.sum(1).mean()


def soft_f1_loss(logits, target, num_classes, eps=1e-7):
    """1 - soft macro F1, with probabilities standing in for hard predictions (differentiable)."""
    p = logits.float().softmax(1)
    t = F.one_hot(target, num_classes).float()
    tp, fp, fn = (p * t).sum(0), (p * (1 - t)).sum(0), ((1 - p) * t).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + eps)
    return 1 - f1.mean()


def frequency_weights(labels, num_classes):
    """1 - frequency of each class in the training labels (the reports' class weights)."""
    freq = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    return torch.tensor(1 - freq, dtype=torch.float32)


def check_criterion_settings(cfg):
    """The f1 criterion trains each head on its hard class alone, so the options that shape the
    target distribution or add an F1 term would do nothing with it: refused, not silently unused."""
    unused = [f"--{key}" for key in ("age_smoothing", "age_sigma", "class_weights", "f1_weight") if cfg[key]]
    if cfg["criterion"] == "f1" and unused:
        raise SystemExit(f"error: --criterion f1 (soft macro F1 on the hard class) does not use {', '.join(unused)}; "
                         "drop them or choose another criterion")


class Criterion:
    """The training loss of a config. Targets: 18-class labels (B), ages in years (B; NaN where
    only the age band is known) and, optionally, class probabilities (B x 18; NaN rows for the
    images labelled with one class), which replace the target distribution of every head except
    under the f1 criterion (it needs one class)."""

    def __init__(self, cfg, train_labels=None):
        if cfg["criterion"] not in CRITERIA:
            raise ValueError(f"criterion '{cfg['criterion']}' is not one of {CRITERIA}")
        self.cfg = cfg
        self.head_weights = ({"logits": 1.0} if cfg["head"] == "single" else
                             {"mask": cfg["mask_weight"], "gender": cfg["gender_weight"], "age": cfg["age_weight"]})
        self.class_weights = {}
        if cfg["class_weights"] and train_labels is not None:
            mask, gender, band = decode_class(np.asarray(train_labels))
            task_labels = {"logits": train_labels, "mask": mask, "gender": gender, "age": band}
            self.class_weights = {h: frequency_weights(task_labels[h], self.num_classes(h)) for h in self.head_weights}

    @staticmethod
    def num_classes(head):
        return {"logits": NUM_CLASSES, "mask": 3, "gender": 2, "age": 3}[head]

    def head_loss(self, head, logits, target, ages, soft=None):
        cfg, n = self.cfg, self.num_classes(head)
        if cfg["criterion"] == "f1":
            return soft_f1_loss(logits, target, n)
        band_of = (torch.arange(n) % 3) if head in ("logits", "age") else None
        smoothing = cfg["label_smoothing"] if cfg["criterion"] == "label_smoothing" else 0.0
        band_dist = None
        if cfg["age_sigma"] > 0 and band_of is not None:  # a NaN age (band known only) keeps its band one-hot
            one_hot = F.one_hot(band_of.to(target.device)[target], 3).float()
            band_dist = torch.where(ages.isnan()[:, None], one_hot,
                                    age_band_distribution(ages, cfg["age_threshold"], cfg["age_sigma"]))
        dist = soft_targets(target, n, smoothing, cfg["age_smoothing"], band_of, band_dist)
        if soft is not None:
            dist = torch.where(soft[:, :1].isnan(), dist, head_probabilities(soft.nan_to_num(), head))
        gamma = cfg["focal_gamma"] if cfg["criterion"] == "focal" else 0.0
        weight = self.class_weights.get(head)
        loss = focal_loss(logits, dist, gamma, None if weight is None else weight.to(logits.device))
        if cfg["f1_weight"] > 0:
            loss = loss + cfg["f1_weight"] * soft_f1_loss(logits, target, n)
        return loss

    def __call__(self, outputs, labels, ages, soft=None):
        mask, gender, band = decode_class(labels)
        targets = {"logits": labels, "mask": mask, "gender": gender, "age": band}
        parts = {h: self.head_loss(h, outputs[h], targets[h], ages, soft) for h in self.head_weights}
        total = sum(w * parts[h] for h, w in self.head_weights.items())
        if "age_value" in outputs:
            # mean squared error over the images whose age is known (band-only rows are left out);
            # masked rather than indexed, so CUDA never waits for the host
            known = ~ages.isnan()
            squared = (outputs["age_value"].float() - ages.float().nan_to_num() / 100) ** 2
            parts["age_value"] = (squared * known).sum() / known.sum().clamp(min=1)
            total = total + self.cfg["age_regression"] * parts["age_value"]
        return total, {k: v.detach() for k, v in parts.items()}
