"""On a CUDA GPU (skipped on a machine without one, such as CI): train.py trains with mixed
precision, channels-last and cudnn.benchmark (also with the recipe's age losses, a weight average
and cache workers), and what it saves predicts the same on the GPU (autocast) as on the CPU
(float32)."""
import numpy as np
import pandas as pd
import pytest
import torch

import inference
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("extra", [{"cache_workers": 0}, {"ema_decay": 0.9, "cache_workers": 2, "age_regression": 0.1, "age_sigma": 5.0}],
                         ids=["main_process_reads_the_cache", "recipe_losses_ema_cache_workers"])
def test_mixed_precision_training_on_cuda_predicts_like_the_cpu(train_cfg, inference_cfg, extra):
    cfg = {**train_cfg, "model": "efficientnet-lite0", "pretrained": False, "resize": [64, 48], "epochs": 3,
           "batch_size": 16, "amp": True, "channels_last": True, "device": "cuda", **extra}
    autocast, _ = train.autocast_for(torch.device("cuda"), cfg["amp"])
    with autocast():  # the GPU really computes in reduced precision
        assert torch.ones(2, 2, device="cuda").matmul(torch.ones(2, 2, device="cuda")).dtype in (torch.bfloat16, torch.float16)

    run_dir, summaries = train.main(cfg)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 3 and np.isfinite(metrics["train_loss"]).all() and metrics["valid_f1"].between(0, 1).all()
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]  # it learns
    state = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    predict = {**inference_cfg, "tta": "flip", "eval_dir": ""}
    on_gpu, images = inference.predict_eval([run_dir / "best.pt"], predict, torch.device("cuda"))
    on_cpu, _ = inference.predict_eval([run_dir / "best.pt"], predict, torch.device("cpu"))
    assert on_gpu.shape == (len(images), 18)
    np.testing.assert_allclose(on_gpu.sum(1), 1, atol=1e-3)
    assert np.abs(on_gpu - on_cpu).max() < 0.05  # bf16/fp16 rounding, not a different model
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).mean() >= 0.95
