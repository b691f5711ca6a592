"""The HTTP serving stack (``reformer-dist serve``); imports neither DeepSpeed nor the training code.

Modules, outside in: ``server`` (uvicorn, graceful drain on SIGTERM), ``app`` (the OpenAI-compatible
HTTP API), ``protocol`` (request schemas, error shape), ``engine`` (continuous batching on a worker
thread), ``sampling`` and ``textstream`` (token choice, incremental detokenization with stop strings),
``backends`` (PyTorch / ONNX Runtime / TensorRT), ``metrics`` (Prometheus), ``config`` (ServeConfig).
"""
