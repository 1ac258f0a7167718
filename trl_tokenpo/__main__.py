"""`python -m trl_tokenpo tdpo|tisdpo|estimate [options]`: the `trl-tokenpo` command."""

from .cli import main


raise SystemExit(main())
