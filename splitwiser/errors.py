"""The errors a job reports to its user, and how: a UserError as one line with exit status 2, WorkersFailed
with status 1 (jobs/__init__.py). Every module raises these; none of them needs anything else to."""


class UserError(Exception):
    """A mistake the user can fix (bad path, column, value): reported as one line, no traceback."""


class WorkersFailed(Exception):
    """The worker processes could not finish the run; what they wrote is on disk, and a rerun resumes."""


class UnsupportedModel(Exception):
    """The fast engine has no adapter for this model: the job falls back to transformers' generate."""
