"""Built-in middlewares, installed as llmproxy.middlewares."""
