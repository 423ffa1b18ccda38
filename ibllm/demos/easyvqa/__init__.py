"""The easy-VQA demo on real data (``make eval``): :mod:`.data` (labels read off the questions, caption shards,
instructions), :mod:`.towers` (stage 0) and :mod:`.command` (``python -m ibllm easyvqa prepare|evaluate``)."""
