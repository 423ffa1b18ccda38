"""The command-line machinery of the verbs: typed functions registered as command lines (:mod:`.registry`)
and one-line errors for bad options and config files (:mod:`.errors`). It imports neither torch nor the
rest of ``ibllm``, so entry points on any floor (the verbs in :mod:`ibllm.cli`, ``python -m ibllm.slurm``,
the Lightning verbs) use it."""
