"""Why does L0 rise during the final lr decay? standard, target 40, 1M tokens, benchmark's lr/l0_start.
A: default schedule (decay last 20%), checkpoint kept at step 820 (decay starts at 1024-204=820).
B: no decay (decay over 1 step), controller to the end.
C: default decay, controller frozen at step 820.
"""
import json, math, shutil, sys
from pathlib import Path
import torch
from saestrata.train import trainer as T
from saestrata.train.trainer import SAESpec, TrainConfig, train

OUT = Path("/work/exp/l0drift")  # run dir on the machine that trained them (weights not committed)
STORE = Path("/work/bench-data/store-train")
spec = lambda: [SAESpec(name="standard-l0=40", arch="standard", hparams={}, target_l0=40.0,
                        l0_start=0.02295228106402696)]
base = dict(store=STORE, layer=8, specs=None, d_sae=2048, tokens=1048576, lr=0.009050966799187809,
            autocast=False, seed=0)

def cfg(name, **kw):
    """The benchmark's matched settings for standard at target 40, run dir ``OUT/name``, with ``kw`` overrides."""
    d = dict(base, **kw); d["specs"] = spec()
    return TrainConfig(out=OUT / name, **d)

which = sys.argv[1]
if which == "A":
    train(cfg("A", checkpoint_every=820, stop_after_step=820), progress=False)
    shutil.copy(OUT / "A" / "checkpoint.pt", OUT / "A_step820.pt")
    train(cfg("A", checkpoint_every=820, resume=True), progress=False)
elif which == "B":
    train(cfg("B", decay_frac=1e-9, checkpoint_every=0), progress=False)
elif which == "C":
    orig = T.L0Controller
    class Frozen(orig):
        """The trainer's L0 controller with the multiplier frozen from step 820 (the decay's start) on."""
        def __init__(self, target, start, stop, **kw):
            super().__init__(target, start, stop, gain=max(0.05, 8.0 / max(1, stop - start)), **kw)
            self.stop = 820
    T.L0Controller = Frozen
    train(cfg("C", checkpoint_every=0), progress=False)
