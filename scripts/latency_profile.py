"""Write a small latency profile JSON (docs-latency.md) from the per-call seconds in a trace JSONL or a bench JSON.

    python scripts/latency_profile.py profiles/20261201T0344Z-h200-replay-compiled/trace.jsonl \
        --out profiles/latency/h200-compiled.json --notes "..."
    python scripts/latency_profile.py bench-h200-7b.json:compiled+fp8 --out profiles/latency/h200-compiled-fp8.json

The samples are copied exactly (no rounding), so the profile and its source give the same latency model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rtloop.errors import RtloopError
from rtloop.runtime.latency import load_samples, profile_document


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", metavar="FILE[:ENGINE]", help="a trace JSONL, a bench JSON (with :ENGINE) or a profile")
    p.add_argument("--out", type=Path, required=True, help="the latency profile JSON to write")
    p.add_argument("--notes", default=None, help="provenance to record (default: what the source file says)")
    args = p.parse_args()
    try:
        samples = load_samples(args.source)
    except RtloopError as e:
        print(f"latency_profile: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(profile_document(samples, args.notes), indent=1) + "\n")
    print(f"wrote {args.out}: {len(samples.seconds)} samples of {samples.engine} on {samples.machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
