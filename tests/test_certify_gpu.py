"""bfloat16 autocast must not bias smoothing votes (GPU only; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.certifiers.smoothing import sample_counts
from bench.data.base import get_dataset
from bench.models.backbones import SmallCNN
from bench.models.defended import DefendedModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_votes_agree_with_fp32_on_a_trained_model():
    device = torch.device("cuda")
    dataset = get_dataset("digits")
    spec = dataset.spec
    train, test = dataset.load("train", None, spec.image_size), dataset.load("test", None, spec.image_size)
    torch.manual_seed(0)
    model = DefendedModel(SmallCNN(1, spec.num_classes, image_size=spec.image_size), spec.mean, spec.std,
                          spec.shape(spec.image_size), spec.num_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    x_all, y_all = train.images.to(device), train.labels.to(device)
    for _ in range(200):
        idx = torch.randint(len(x_all), (128,), device=device)
        x = x_all[idx]
        loss = nn.functional.cross_entropy(model(x + 0.25 * torch.randn_like(x)), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = test.images[:32].to(device)
    # the same noise through both precisions: count disagreeing argmaxes
    noise = 0.25 * torch.randn(2000, *x.shape[1:], device=device)
    disagree = 0
    with torch.inference_mode():
        for i in range(len(x)):
            fp32 = model(x[i] + noise).argmax(1)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf16 = model(x[i] + noise).argmax(1)
            disagree += int((fp32 != bf16).sum())
    assert disagree / (len(x) * len(noise)) < 0.005
    torch.manual_seed(1)
    full = sample_counts(model, x, 20_000, 0.25).double() / 20_000
    torch.manual_seed(1)
    half = sample_counts(model, x, 20_000, 0.25, amp=True).double() / 20_000
    assert float((full - half).abs().max()) < 0.01
