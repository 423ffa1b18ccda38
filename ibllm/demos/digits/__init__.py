"""The embedded CPU demo on scikit-learn's handwritten digits.

* :mod:`.captions` — digit words, the one caption list, which digits a text names;
* :mod:`.pixels` — the digits, their fixed split and the exact tensor form of the stage-1 views;
* :mod:`.data` — caption shards (stage 1) and instructions (stage 2);
* :mod:`.towers` — stage 0: the ``demo`` preset's vision + text towers (``python -m ibllm bind``);
* :mod:`.prepare` — ``python -m ibllm demo prepare``;
* :mod:`.callbacks` — the held-out accuracy callbacks of ``experiments/demo_*.yaml``.
"""
