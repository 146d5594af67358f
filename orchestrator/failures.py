"""Which worker failures Ray Train may retry: a crash may go away on a restart, a user's mistake never does.

Ray Train restarts the worker group after any worker error, up to `trainer.max_failures` times. An
LmforgeError raised on a worker (bad data, a loader that does not match its checkpoint, a validation split
too small for the world size) would fail again the same way on every restart, each costing the start-up
again, before the user saw the message. The policy below ends the run at the first one.
"""

from common.errors import LmforgeError


def worker_user_error(error: BaseException) -> LmforgeError | None:
    """The LmforgeError behind a worker failure, whose message says it all, without Ray's traceback around it."""
    for failure in getattr(error, "worker_failures", {}).values():
        seen = 0
        while failure is not None and seen < 8:
            if isinstance(failure, LmforgeError):
                return failure
            failure, seen = getattr(failure, "cause", None) or failure.__cause__, seen + 1
    return None


def failure_policy(failure_config):
    """Ray Train's default failure policy, except that a worker's LmforgeError is raised at once. None where
    this Ray has no such policy class (its default then retries as before)."""
    try:
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    except ImportError:
        return None

    class UserErrorsFailFast(DefaultFailurePolicy):
        def make_decision(self, training_failed_error):
            if worker_user_error(training_failed_error) is not None:
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return UserErrorsFailFast(failure_config)
