"""The HTTP serving stack (``reformer-dist serve``); imports neither DeepSpeed nor the training code.

Modules, outside in: ``server`` (uvicorn, graceful drain on SIGTERM), ``app`` (the OpenAI-compatible
HTTP API), ``protocol`` (request schemas, error shape), ``chat`` (optional chat templates), ``request_engine``
(the worker thread: admission, timeouts, events), ``textstream`` (incremental detokenization with stop
strings), ``metrics`` (Prometheus), ``config`` (ServeConfig). Decoding itself (backends, sampler,
continuous batching) is ``reformer_dist.decoding``, shared with ``reformer-dist generate``.
"""
