"""The few exception types fastrelay raises across module boundaries."""


class FastrelayError(Exception):
    """Base class: anything fastrelay raises on purpose derives from it."""


class ConfigError(FastrelayError):
    """A configuration file is unusable.

    The message always names the file, the key (dotted path) and the problem,
    so an administrator can fix it without reading code.
    """

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


class SpoolError(FastrelayError):
    """The spool could not make a message durable (disk full, read-only, I/O error)."""
