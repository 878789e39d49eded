"""Many episodes, one results file: the machinery behind `rtloop sweep` and `rtloop eval`.

- grid: the cells of a sweep (mode x latency, each a set of `rtloop run` options) and the episode keys;
- episode: `run_one_episode(spec, task, episode)`, one episode through the ordinary runtime;
- pool: episodes in worker processes (spawn), results back to the parent;
- results: the append-only JSONL (fsync per episode), resume, the refusal of another grid's file;
- stats, report: Wilson intervals, per-cell and per-task tables (Markdown, JSON), the plot;
- progress: the bar on stderr.
"""
