import math

import torch
import torch.nn.functional as F

from xlip.losses import ContrastiveLoss, MIMLoss, MLMLoss
from xlip.model.vision import patchify


def naive_contrastive(img, txt, scale, keys):
    """Loop implementation of the multi-positive symmetric InfoNCE."""
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        pos = [j for j in range(B) if keys[j] == keys[i]]
        li = sum(-torch.log(torch.exp(scale * img[i] @ txt[j]) /
                            sum(torch.exp(scale * img[i] @ txt[k]) for k in range(B)))
                 for j in pos) / len(pos)
        lt = sum(-torch.log(torch.exp(scale * txt[i] @ img[j]) /
                            sum(torch.exp(scale * txt[i] @ img[k]) for k in range(B)))
                 for j in pos) / len(pos)
        total = total + 0.5 * (li + lt)
    return total / B


def test_contrastive_matches_naive_forward_and_backward():
    torch.manual_seed(0)
    a = torch.randn(6, 8, dtype=torch.float64)
    b = torch.randn(6, 8, dtype=torch.float64)
    keys = torch.tensor([0, 1, 1, 2, 3, 1])  # three rows share a text: positives of each other
    scale = torch.tensor(5.0, dtype=torch.float64)
    x1, y1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    img, txt = F.normalize(x1, dim=-1), F.normalize(y1, dim=-1)
    loss, per = ContrastiveLoss()(img.double(), txt.double(), scale, keys)
    loss.backward()
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = naive_contrastive(F.normalize(x2, dim=-1), F.normalize(y2, dim=-1), scale, keys.tolist())
    ref.backward()
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)
    assert torch.allclose(y1.grad, y2.grad, atol=1e-6)
    assert per.shape == (6,)


def test_contrastive_perfect_alignment_is_low():
    e = torch.eye(4)
    loss, _ = ContrastiveLoss()(e, e, torch.tensor(100.0), torch.arange(4))
    assert loss < 1e-3
    loss_unif, _ = ContrastiveLoss()(e, e, torch.tensor(0.0), torch.arange(4))
    assert math.isclose(float(loss_unif), math.log(4), rel_tol=1e-5)


def test_mim_loss_only_masked_patches_normalised_target():
    torch.manual_seed(0)
    images = torch.randn(2, 1, 16, 16)
    loss_fn = MIMLoss(patch_size=8, norm_pix=True)
    target = loss_fn.target(images)  # (2, 4, 64)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    pred = target.clone()
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred[0, 1] += 10.0  # error on a visible patch: ignored
    loss, _ = loss_fn(pred, images, mask)
    assert loss.abs() < 1e-6
    pred[0, 0] += 1.0  # error on a masked patch: counted, mean over 3 masked patches
    loss, per = loss_fn(pred, images, mask)
    assert torch.isclose(loss, torch.tensor(1.0 / 3), atol=1e-5)
    assert torch.isclose(per[0], torch.tensor(0.5), atol=1e-5) and per[1].abs() < 1e-6
    raw = patchify(images, 8).flatten(2)
    assert not torch.allclose(raw, target)


def test_mim_feature_target_matches_naive_layer_normed_mse():
    """mim.target=features: the prediction is compared with each teacher token after a
    LayerNorm without affine parameters, on masked patches only."""
    torch.manual_seed(0)
    images = torch.randn(2, 1, 16, 16)
    feats, pred = torch.randn(2, 4, 6) * 3 + 1, torch.randn(2, 4, 6)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 0]])
    loss, per = MIMLoss(patch_size=8)(pred, images, mask, feats)
    errs = [[0.0] * 4 for _ in range(2)]
    for b in range(2):
        for n in range(4):
            f = feats[b, n]
            t = (f - f.mean()) / (f.var(unbiased=False) + 1e-5).sqrt()
            errs[b][n] = float(((pred[b, n] - t) ** 2).mean())
    naive = [sum(e * float(m) for e, m in zip(errs[b], mask[b])) / float(mask[b].sum())
             for b in range(2)]
    assert torch.allclose(per, torch.tensor(naive), atol=1e-5)
    total = sum(errs[b][n] * float(mask[b, n]) for b in range(2) for n in range(4)) / 4
    assert torch.isclose(loss, torch.tensor(total), atol=1e-5)


def test_mlm_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    labels = torch.tensor([1, 2, 3, 4, 5])
    rows = torch.tensor([0, 0, 1, 2, 2])
    loss, per = MLMLoss()(logits, labels, rows, batch=4)
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.isclose(loss, ce.mean())
    assert torch.allclose(per, torch.stack([ce[:2].mean(), ce[2], ce[3:].mean(), torch.tensor(0.)]))


def naive_soft_contrastive(img, txt, scale, keys, labels):
    """Loops: target weight 1 for an equal key, else the cosine of the label vectors."""
    B = img.shape[0]

    def weight(i, j):
        if keys[i] == keys[j]:
            return 1.0
        li, lj = labels[i], labels[j]
        if li.norm() == 0 or lj.norm() == 0:
            return 0.0
        return float(li @ lj / (li.norm() * lj.norm()))

    total = 0.0
    for i in range(B):
        w = torch.tensor([weight(i, j) for j in range(B)], dtype=img.dtype)
        w = w / w.sum()
        li = -(w * torch.log_softmax(scale * torch.stack([img[i] @ txt[k] for k in range(B)]),
                                     0)).sum()
        lt = -(w * torch.log_softmax(scale * torch.stack([txt[i] @ img[k] for k in range(B)]),
                                     0)).sum()
        total = total + 0.5 * (li + lt)
    return total / B


def test_label_targets_match_naive_and_make_equal_findings_positives():
    torch.manual_seed(1)
    a = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    keys = torch.tensor([0, 1, 2, 3, 4])  # all texts differ
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]],
                          dtype=torch.float64)  # row 3 has no labels
    scale = torch.tensor(4.0, dtype=torch.float64)
    img, txt = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    loss, _ = ContrastiveLoss()(img, txt, scale, keys, labels)
    ref = naive_soft_contrastive(img, txt, scale, keys.tolist(), labels)
    assert torch.allclose(loss.double(), ref, atol=1e-6)
    ga = torch.autograd.grad(loss, a, retain_graph=True)[0]
    assert torch.allclose(ga, torch.autograd.grad(ref, a)[0], atol=1e-6)
    # rows 0 and 1 have the same findings: hard (text) targets prefer them apart, soft
    # targets prefer them together
    labels = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]],
                          dtype=torch.float64)
    apart = torch.eye(5, dtype=torch.float64)
    together = apart.clone()
    together[1] = together[0]
    scale = torch.tensor(30.0)

    def cl(x, lab):
        return float(ContrastiveLoss()(x, x, scale, keys, lab)[0])

    assert cl(together, labels) < cl(apart, labels)
    assert cl(apart, None) < cl(together, None)


def test_contrastive_logits_stay_fp32_under_bf16_autocast():
    """Training runs the loss inside bf16 autocast; the logits must still be fp32 matmuls
    (at logit scale 100, bf16's cosine error moves the loss by ~1e-2)."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(32, 64), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(32, 64), dim=-1)
    keys = torch.arange(32)
    scale = torch.tensor(100.0)
    ref, _ = ContrastiveLoss()(img, txt, scale, keys)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, per = ContrastiveLoss()(img, txt, scale, keys)
    assert got.dtype == per.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 1e-5, (got.item(), ref.item())
