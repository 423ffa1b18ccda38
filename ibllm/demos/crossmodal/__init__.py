"""Cross-modal transfer on the digits demo (the paper's Fig. 4 in miniature): an audio tower, then captions.

Both parts are regenerable by anyone from Debian's ``espeak-ng`` and scikit-learn's digits:
:mod:`.speech` synthesises spoken digits, :mod:`.audio_tower` binds an audio branch to the frozen demo vision
tower, and :mod:`.experiment` captions held-out images, text and speech with the image-only stage-1 model,
naive and with the visual cache (``python -m ibllm crossmodal``).
"""
