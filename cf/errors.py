"""User-facing errors: the CLI prints these as one clear line instead of a traceback."""


class CfError(Exception):
    """An error in what the user asked for or handed us, with the fix in its message."""


class VideoReadError(CfError):
    """A video that cannot be decoded; always names the file."""

    def __init__(self, path, reason: str):
        super().__init__(f"cannot read video {str(path)!r}: {reason}")
        self.path = str(path)
