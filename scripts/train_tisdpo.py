# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""TIS-DPO (estimate the token weights, then train) from a checkout: `trl-tokenpo tisdpo`, whose code is `trl_tokenpo/scripts/tisdpo.py`.

```bash
accelerate launch scripts/train_tisdpo.py [options]     # = accelerate launch -m trl_tokenpo.scripts.tisdpo [options]
python scripts/train_tisdpo.py --help
```
"""

from trl_tokenpo.scripts.tisdpo import run


if __name__ == "__main__":
    raise SystemExit(run(prog="train_tisdpo.py"))
