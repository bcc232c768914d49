"""The one base class for errors caused by the user's input rather than by a bug.

Entry points (`pretrain`, the tools) catch `UserError` alone and print its message as one line, without a
traceback; each concern keeps its own subclass (which may also derive from ValueError / RuntimeError so that
callers catching those keep working).
"""


class UserError(Exception):
    """Bad flags, files, layouts or data: the message says what is wrong and how to fix it."""
