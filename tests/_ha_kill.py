"""scripts/pretrain.py with an injected failure (for tests/test_resilience.py): on the first launch
attempt (TORCHELASTIC_RESTART_COUNT 0), rank $HA_KILL_RANK kills itself with SIGKILL during step
$HA_KILL_STEP: after its forward / backward, before the gradient reduction (HA_KILL_AT=reduce), or
after updating its optimizer shards, before the all-gather of the new parameters (HA_KILL_AT=update)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import pretrain  # noqa: E402

if os.environ.get("RANK") == os.environ.get("HA_KILL_RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    step = int(os.environ["HA_KILL_STEP"])
    calls = [0]

    def _die_on(obj, name):
        orig = getattr(obj, name)

        def wrapped(*a, **kw):
            calls[0] += 1
            if os.environ["HA_KILL_AT"] == "reduce" and calls[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            out = orig(*a, **kw)
            if os.environ["HA_KILL_AT"] == "update" and calls[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(obj, name, wrapped)

    if os.environ["HA_KILL_AT"] == "reduce":
        from pmodel.parallel.data import DataParallel
        _die_on(DataParallel, "finish")
    else:
        import pmodel.parallel.zero as zero
        _die_on(zero, "apply_updates")  # the fp32 main shards, updated in place

sys.exit(pretrain.main())
