"""What the tests (and some benchmarks) need beyond the package: a fault-injecting teacher server, the annotate
app in a child process, tiny random LLaMA models. Tests import `support.*` (tests/ is on sys.path under
pytest); benchmarks, which put the repo root on sys.path, import `tests.support.*`."""
