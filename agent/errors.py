"""Errors a person sees: one class, a message that says what and where.

Anything raised as `UserError` is printed as `egress-agent: error: <message>` and ends with exit
code 2, never a traceback. Raise it wherever input is parsed, with the file, line/offset and field.
"""


class UserError(Exception):
    """A problem with the user's input or configuration (exit code 2)."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []

    def __str__(self) -> str:
        head = super().__str__()
        if not self.problems:
            return head
        return head + "\n" + "\n".join(f"  {p}" for p in self.problems)
