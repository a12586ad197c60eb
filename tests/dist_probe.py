"""Probe run under `accelerate launch` by tests/test_distributed.py: builds the real Trainer and
writes, per rank, what it sees to <out>/rank<r>.json.

    accelerate launch --multi_gpu --num_processes 2 tests/dist_probe.py OUT order|eval|stop:K [overrides]

stop:K: the last rank sends itself SIGTERM right after optimizer step K, then every rank fits; each
writes the step it stopped at.
"""

import gc
import json
import signal
import sys
from pathlib import Path

from vae_dist.config import load_config
from vae_dist.trainer import Trainer

out, mode, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
trainer = Trainer(load_config(None, overrides))
rank = trainer.accelerator.process_index
result = {"processes": trainer.accelerator.num_processes, "accum": trainer.run.accum, "micro": trainer.run.micro}
if mode == "order":  # the micro-batches of indices this rank gets in epochs 0 and 1, and epoch 0 resumed at step 2
    for epoch, skip in ((0, 0), (1, 0), (0, 2)):
        order = trainer.plan.epoch(epoch)[skip:]  # [steps, accum, micro]: where a resume at step `skip` starts
        result[f"epoch{epoch}_skip{skip}"] = order.flatten(0, 1).tolist()  # micro-batches in order
elif mode == "eval":
    result["eval"] = trainer.evaluate()
elif mode.startswith("stop:"):
    signal_at, after = int(mode.split(":")[1]), trainer.after_optimizer_step

    def after_then_signal(t: Trainer = trainer) -> None:
        after()
        if t.step == signal_at and rank == t.accelerator.num_processes - 1:
            signal.raise_signal(signal.SIGTERM)

    trainer.after_optimizer_step = after_then_signal
    result["summary"] = trainer.fit()  # fit ends the run itself
out.mkdir(parents=True, exist_ok=True)
(out / f"rank{rank}.json").write_text(json.dumps(result))
if not mode.startswith("stop:"):
    trainer.accelerator.wait_for_everyone()
    trainer.close()  # the one end of a run: tears the gloo group down before exit
del trainer  # and free it now: at interpreter shutdown gloo's threads can abort the process (see train.py)
gc.collect()
