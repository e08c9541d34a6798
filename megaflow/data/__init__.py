"""Prompt sets and per-iteration prompt batches."""
from megaflow.data.prompts import PromptSet

__all__ = ["PromptSet"]
