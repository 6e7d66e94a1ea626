"""Test infrastructure that ships with the package: a loopback OpenAI-compatible server that injects faults."""
