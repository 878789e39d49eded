"""Errors a user can act on. Each one prints as a single line (see rtloop.cli)."""


class RtloopError(Exception):
    """Base class: the message is shown to the user as one line, with no traceback."""

    kind = "error"  # bounded label value for rtloop_errors_total{kind=...}


class CheckpointError(RtloopError):
    kind = "checkpoint"


class UnnormKeyError(RtloopError):
    kind = "unnorm_key"


class InputError(RtloopError):
    """An image, prompt or option the pipeline cannot accept."""

    kind = "input"


class ActionError(RtloopError):
    """The model produced something that is not a valid action (non-action token, NaN)."""

    kind = "action"


class SimError(RtloopError):
    kind = "sim"


class PolicyError(RtloopError):
    kind = "policy"


class MetricsError(RtloopError):
    """The metrics endpoint cannot be served (port in use, bad address)."""

    kind = "metrics"


class WorkerError(RtloopError):
    """An env worker of a fleet died or stalled: its episode ends on this error, the fleet goes on."""

    kind = "worker"
