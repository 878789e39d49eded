"""The fleet: N envs, each in its own worker (a process, or a Ray actor), one inference task batching
their newest frames (`rtloop run --envs N`, `rtloop eval --envs N`). README, "A fleet", says how it works."""
