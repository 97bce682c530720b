"""Optimiser settings of the seed presets (registry.OPTIMIZER_HPARAMS) reach the trainer."""

import torch


def test_seed_presets_carry_their_papers_adamw_settings():
    from saestrata.train.trainer import SAESpec, TrainConfig, _optimizer
    from saestrata.train.registry import build

    cfg = TrainConfig(store=None, layer=0, out=None, specs=[], lr=4e-4)

    def opt(arch, lr=None, **hp):
        return _optimizer(SAESpec(arch, arch, hp, lr), build(arch, 16, 64, **hp), cfg)

    tiered = opt("seed003-tiered")  # seed 003 sec. 5: AdamW, lr 3e-4, weight decay 1e-4
    assert isinstance(tiered, torch.optim.AdamW)
    assert tiered.defaults["lr"] == 3e-4 and tiered.defaults["weight_decay"] == 1e-4
    grouped = opt("seed001_fixed_ortho")  # seed 001 sec. 5: weight decay 0.01
    assert isinstance(grouped, torch.optim.AdamW) and grouped.defaults["weight_decay"] == 0.01
    plain = opt("topk")  # baselines: plain Adam at the run's learning rate
    assert type(plain) is torch.optim.Adam and plain.defaults["lr"] == 4e-4
    swept = opt("seed004-groups", lr=1e-3, weight_decay=0.5)  # --set lr / weight_decay win over the preset
    assert isinstance(swept, torch.optim.AdamW)
    assert swept.defaults["lr"] == 1e-3 and swept.defaults["weight_decay"] == 0.5
