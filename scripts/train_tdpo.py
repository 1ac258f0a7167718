# Copyright 2026 The trl-tokenpo developers. Licensed under the Apache License, Version 2.0.
"""TDPO from a checkout: `trl-tokenpo tdpo`, whose code is `trl_tokenpo/scripts/tdpo.py`.

```bash
accelerate launch scripts/train_tdpo.py [options]     # = accelerate launch -m trl_tokenpo.scripts.tdpo [options]
python scripts/train_tdpo.py --help
```
"""

from trl_tokenpo.scripts.tdpo import run


if __name__ == "__main__":
    raise SystemExit(run(prog="train_tdpo.py"))
