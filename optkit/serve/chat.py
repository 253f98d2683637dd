"""Chat templates: a conversation -> one prompt string for a base model, plus the stop
strings that end the assistant's turn.

OPT is a base model with no chat format of its own, so optkit renders plain text:

``plain`` (every OPT model)::

    {system}                         <- each system / developer message, then a blank line

    User: {user message}
    Assistant: {assistant message}
    User: {user message}
    Assistant:                       <- the model continues here; stop at "\\nUser:"

``instruct`` (OPT-IML models, chosen when the served name contains ``opt-iml``)::

    {system}

    Instruction: {user message}

    Output: {assistant message}

    Instruction: {user message}

    Output:                          <- stop at "\\n\\nInstruction:"

The reply's leading whitespace (the model writes ``" Hello"`` after ``"Assistant:"``) is
dropped from the message content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """How each role's message is written, what follows the last one, and where the
    assistant's turn ends."""

    name: str
    system: str
    user: str
    assistant: str
    generation: str
    stop: tuple[str, ...]

    def render(self, messages: Sequence[tuple[str, str]],
               add_generation_prompt: bool = True) -> str:
        """``messages``: (role, text) pairs; roles system, developer, user, assistant."""
        parts = []
        for role, text in messages:
            fmt = {"system": self.system, "developer": self.system, "user": self.user,
                   "assistant": self.assistant}.get(role)
            if fmt is None:
                raise ValueError(f"unknown chat role {role!r}")
            parts.append(fmt.format(content=text.strip()))
        if add_generation_prompt:
            parts.append(self.generation)
        return "".join(parts)


PLAIN = ChatTemplate("plain", system="{content}\n\n", user="User: {content}\n",
                     assistant="Assistant: {content}\n", generation="Assistant:",
                     stop=("\nUser:",))
INSTRUCT = ChatTemplate("instruct", system="{content}\n\n",
                        user="Instruction: {content}\n\n", assistant="Output: {content}\n\n",
                        generation="Output:", stop=("\n\nInstruction:",))
TEMPLATES = {t.name: t for t in (PLAIN, INSTRUCT)}


def template_for(model_name: str) -> ChatTemplate:
    """``instruct`` for OPT-IML models, ``plain`` for every other."""
    return INSTRUCT if "opt-iml" in model_name.lower() else PLAIN


def get_template(name: str | None, model_name: str) -> ChatTemplate:
    """A template by name (``plain``, ``instruct``), or the model's when ``name`` is None."""
    if name is None:
        return template_for(model_name)
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from {sorted(TEMPLATES)}")
    return TEMPLATES[name]
