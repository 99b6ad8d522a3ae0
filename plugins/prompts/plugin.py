"""Registers the prompt-file source."""

from mdmrl.hookspecs import hookimpl


@hookimpl
def register_prompt_sources(register):
    from mdmrl_plugins.prompts.files import PromptFile

    register(PromptFile)
