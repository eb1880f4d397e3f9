"""`diffusers-moc generate` in which one process fails at a denoising step, for `test_distributed_generate.py`.

`FAIL_RANK` fails at step `FAIL_STEP`: `FAIL_HOW=raise` raises an error, `FAIL_HOW=kill` kills the process (SIGKILL,
no word to anyone). The other processes run unchanged.
"""

from __future__ import annotations

import os
import signal
import sys

from diffusers_moc.cli import main
from diffusers_moc.pipelines import LongVideoPipeline

_predict_noise = LongVideoPipeline._predict_noise


def _failing(self, latents, t, step, conditioning):
    if os.environ["RANK"] == os.environ["FAIL_RANK"] and step == int(os.environ["FAIL_STEP"]):
        if os.environ["FAIL_HOW"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step}")
    return _predict_noise(self, latents, t, step, conditioning)


if __name__ == "__main__":
    LongVideoPipeline._predict_noise = _failing
    sys.exit(main(sys.argv[1:]))
