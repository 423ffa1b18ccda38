"""OpenAI-compatible HTTP API: ``python -m ibllm serve --api`` (FastAPI + uvicorn, 127.0.0.1:8000 by default).

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``
(status and queue counters; no key needed). With ``--api-key`` (or ``$IBLLM_API_KEY``) every ``/v1``
route needs ``Authorization: Bearer KEY``. Everything runs through the inference API the chat and the
browser demo use (``ibllm.load`` -> ``InferenceModel``).

Request (``POST /v1/chat/completions``)
---------------------------------------
OpenAI fields: ``model`` (the served name, ``--model-name``, default ``ibllm``), ``messages``
(``system``/``developer``, ``user``, ``assistant``), ``temperature`` (0 = greedy), ``top_p``,
``max_tokens`` (or ``max_completion_tokens``), ``stop`` (up to 4 strings), ``seed``, ``stream`` with
``stream_options.include_usage``. Omitted sampling fields take the server's defaults (``--temperature``,
``--top-p``, ``--max-gen-len``: 0.1 / 0.75 / 128, the demo's). ``user`` content parts:

* ``{"type": "text", "text": "..."}``
* ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` — or a path / ``file://``
  URL of a file inside ``--media-dir``; remote URLs are refused, never fetched;
* ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}}`` (wav, flac, ogg, mp3).

Extension fields (top level; with the ``openai`` client pass them in ``extra_body``):

* ``inputs``: more inputs of any modality, ``[{"modality": "point"|"video"|"depth"|"thermal"|"imu"|
  "image"|"audio", "data": "<base64 file bytes>"}]``, or ``"path": "<file in --media-dir>"`` instead of
  ``data``, or ``{"modality": "text", "text": "..."}`` for ImageBind's text branch. Point clouds: .npy,
  .ply, .pcd, .obj, .xyz, .pt (tensors only); depth/thermal: 16-bit PNG/TIFF or .npy; IMU: .npy [6, T];
  video: MP4/MOV, WebM/MKV or AVI;
* ``modality_weights``: ``{"image": 0.6, "audio": 0.4}`` (default 1.0 each; the mix is normalised by
  their sum);
* ``visual_cache``: ``{"enabled": true, "k": 10, "temperature": 20, "weight": 0.5}`` (constants left out
  keep the loaded cache's values, by default 10 / 20 / 0.5; without the field the cache is on, as loaded,
  whenever the server was started with ``--cache``).

How messages map onto the project's multi-turn template and which media policy applies:
:mod:`ibllm.server.messages`. How concurrent requests are batched: :mod:`ibllm.server.scheduler`.

Responses and errors
--------------------
``chat.completion`` objects with ``usage`` (prompt and completion tokens); with ``stream: true``,
server-sent ``chat.completion.chunk`` events ending with ``data: [DONE]``. Errors use the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``: 400 malformed JSON / bad field / undecodable media /
remote URL / too many tokens for the context (``context_length_exceeded``), 401 bad key, 403 a path
outside ``--media-dir``, 404 unknown model, 413 body over ``--max-body-mb``, 429 queue full
(``--max-queue``), 504 over ``--timeout``. A client that disconnects stops its generation.
"""
