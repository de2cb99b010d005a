"""`fastllm bench`: load any OpenAI-compatible server (ours or a peer's) and report what users feel.

Kept apart from the server: it needs only httpx, and matplotlib for the plot (the ``bench`` extra).
"""
