"""The commands of `trl-tokenpo` (TRL's layout for its own scripts): `tdpo.py`, `tisdpo.py`, `estimate.py`, and what
they share (`utils.py`, `help.py`). Each one also runs as `python -m trl_tokenpo.scripts.<command>` and under
`accelerate launch -m trl_tokenpo.scripts.<command>`."""
