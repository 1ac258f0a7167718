# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""the TIS-DPO token-reward estimation from a checkout: `trl-tokenpo estimate`, whose code is `trl_tokenpo/scripts/estimate.py`.

```bash
accelerate launch scripts/estimate_weights.py [options]     # = accelerate launch -m trl_tokenpo.scripts.estimate [options]
python scripts/estimate_weights.py --help
```
"""

from trl_tokenpo.scripts.estimate import run


if __name__ == "__main__":
    raise SystemExit(run(prog="estimate_weights.py"))
