"""The one policy factory of run, profile, and every command that drives the runtime (sweep, eval, serve).

`--policy` names what acts:
- `openvla` (default): rtloop's OpenVLA on `--checkpoint` (or the tiny random-weight fallback);
- `expert`: the scripted expert (privileged sim state, no images: the env then renders nothing);
- `ws://HOST:PORT` (or wss://): a remote policy server speaking openpi's protocol (`rtloop serve`, openpi).
The expert and the remote client are imported only when asked for; where this build lacks them the
command says so in one line before anything heavy starts.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from rtloop.errors import InputError

DEFAULT_CHECKPOINT = Path("weights/openvla-7b")
TINY_CACHE_NAME = "openvla-tiny-random"
POLICY_KINDS = ("openvla", "expert", "ws://HOST:PORT")
_PROVIDERS = {"expert": ("rtloop.policy.expert", "ScriptedExpert"), "remote": ("rtloop.serve.client", "make_remote_policy")}


@dataclass(frozen=True)
class PolicySpec:
    kind: str  # "openvla", "expert" or "remote"
    url: str | None = None  # remote only

    @property
    def needs_images(self) -> bool:
        """Known before the policy is built, so the env (built at the same time) can skip rendering."""
        if self.kind != "expert":
            return True
        return bool(getattr(_provider("expert"), "needs_images", True))

    @property
    def engine_label(self) -> str | None:
        """What stands in the bounded `engine` label of the metrics when OpenVLA's engine does not apply."""
        return None if self.kind == "openvla" else self.kind


def parse_policy(value: str) -> PolicySpec:
    """`--policy` checked without importing anything heavy: one line for an unknown kind, a malformed URL,
    or a kind this build does not have."""
    if value == "openvla":
        return PolicySpec("openvla")
    if value == "expert":
        spec = PolicySpec("expert")
    elif value.startswith(("ws://", "wss://")):
        url = urlparse(value)
        try:
            port = url.port
        except ValueError:
            port = None
        if not url.hostname or port is None or url.path not in ("", "/") or url.query:
            raise InputError(f"--policy {value}: a remote policy is ws://HOST:PORT (or wss://HOST:PORT)")
        spec = PolicySpec("remote", value)
    else:
        raise InputError(f"--policy {value!r}: expected {', '.join(POLICY_KINDS)}")
    module, _ = _PROVIDERS[spec.kind]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is missing too
        found = False
    if not found:
        raise InputError(f"--policy {value}: this rtloop has no {module} (the {spec.kind} policy is not installed)")
    return spec


def _provider(kind: str):
    module, name = _PROVIDERS[kind]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise InputError(f"the {kind} policy is not available in this rtloop: {e}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rtloop"


def tiny_random_checkpoint() -> Path:
    """The fallback checkpoint: generated once, then reused while it is what this rtloop would generate (an
    older generator's weights behave differently). Made in a temporary directory and renamed, so an
    interrupted generation never leaves a half-written checkpoint in the cache."""
    import shutil

    from rtloop.policy.checkpoint import make_checkpoint, make_config

    path = cache_dir() / TINY_CACHE_NAME
    try:
        cached = json.loads((path / "config.json").read_text()).get("rtloop_generated")
    except (OSError, ValueError):
        cached = None
    if cached != make_config("tiny", seed=0)["rtloop_generated"]:
        tmp = path.with_name(f"{TINY_CACHE_NAME}.tmp-{os.getpid()}")
        make_checkpoint("tiny", tmp, seed=0)
        shutil.rmtree(path, ignore_errors=True)  # an older generator's, if any
        os.replace(tmp, path)
    return path


def resolve_checkpoint(arg: Path | None) -> Path:
    from rtloop.policy.checkpoint import check_checkpoint_dir

    if arg is not None:
        check_checkpoint_dir(arg)  # explicit and missing: a one-line CheckpointError
        return arg
    if DEFAULT_CHECKPOINT.exists():
        check_checkpoint_dir(DEFAULT_CHECKPOINT)
        return DEFAULT_CHECKPOINT
    path = tiny_random_checkpoint()
    print(f"rtloop: no checkpoint at {DEFAULT_CHECKPOINT}: using a tiny RANDOM-WEIGHT checkpoint ({path}); "
          "the arm will not solve the task", file=sys.stderr)
    return path


def build_policy(args: argparse.Namespace, checkpoint: Path | None, device: str):
    """The policy `args` ask for (the run options after `validate`: policy, policy_process, the OpenVLA
    options, the latency model and inject_mode, clock). `checkpoint` is resolved for OpenVLA only (None otherwise). Runs on
    the thread that will call it, or in the policy child process (--policy-process)."""
    if args.policy_process:
        from rtloop.runtime.policy_process import ProcessPolicy

        in_child = argparse.Namespace(**{**vars(args), "policy_process": False})
        return ProcessPolicy(build_policy, in_child, checkpoint, device)

    spec = parse_policy(args.policy)
    if spec.kind == "expert":
        policy = _provider("expert")()
    elif spec.kind == "remote":
        policy = _provider("remote")(spec.url)
    else:
        import torch

        from rtloop.policy.buckets import MAX_BATCH, batch_bucket
        from rtloop.policy.kernel_options import kernel_options_from_args
        from rtloop.policy.openvla import OpenVLAPolicy

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        # a fleet hands act_batch the newest frame of each env: up to one per env, at most the largest bucket
        max_batch = batch_bucket(min(args.envs or 1, MAX_BATCH))
        policy = OpenVLAPolicy(checkpoint, unnorm_key=args.unnorm_key, suite=args.suite, device=device,
                               engine=args.engine, center_crop=args.center_crop, cuda_wait=args.cuda_wait,
                               max_batch=max_batch, kernel_options=kernel_options_from_args(args),
                               image_threads=args.image_threads)
    from rtloop.runtime.latency import MeasuredLatency

    # On the wall clock a latency model pads each call up to its sample; the policy's own measured time
    # needs no padding, and on the virtual clock the runtime charges the sample without waiting for it.
    if not isinstance(args._latency, MeasuredLatency) and args.clock == "wall":
        from rtloop.runtime.slow import SlowPolicy

        policy = SlowPolicy(policy, args._latency, args.inject_mode)
    return policy
