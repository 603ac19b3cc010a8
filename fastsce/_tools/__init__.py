"""The command-line tools: ``python -m fastsce loss`` (score), ``bench`` (report) and the
implementations both time (impls)."""
