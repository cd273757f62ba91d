"""Zero- and few-shot evaluation (see docs/eval.md).

Nothing is imported here, so that `kosmos --help` does not load torch through this package. Modules:
- `tasks`: task files (`kosmos/configs/eval/*.yaml`) -> `TaskConfig`, validated;
- `datasets`: benchmark formats -> `Sample`s; `raven`: the Raven-style puzzle generator;
- `prompts`, `demos`: interleaved prompts and few-shot demonstration selection;
- `backend`: `load_for_eval(checkpoint)` and `ModelBackend` (generation and likelihood scoring);
- `runners`: samples -> prediction records; `metrics`: records -> scores;
- `harness`: `evaluate(backend, EvalOptions(...))`, with caching, ranks and reports (`report`).
"""
