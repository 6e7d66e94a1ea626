"""`llamakit generate-data`: instructions, conversations, preferences and scores from teacher LLMs.

runner.py is the engine all four share (concurrency, rate limits, retries, resume, usage); each
sub-command module turns input rows into jobs whose work is a few teacher calls.
"""
